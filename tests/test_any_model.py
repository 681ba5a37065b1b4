"""The training loop and every method on users' own models: plain linen, NNX, the Transformer, a function."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import CLASSES, NAMES, ZOO

from metasel import controllers, core, data, dvn, mts, persample, train

pytestmark = pytest.mark.filterwarnings("ignore:.*take the slow vmap path")

CONFIG = train.TrainConfig(epochs=1, batch_size=8, val_batch_size=6, learning_rate=1e-2)


def _dataset(case) -> data.Dataset:
  """A small classification dataset whose samples look like the case's batch (24 train, 12 val, 12 test)."""
  rng = np.random.default_rng(0)
  shape, integer = case.x.shape[1:], jnp.issubdtype(case.x.dtype, jnp.integer)

  def split(n, offset):
    x = rng.integers(0, 30, (n, *shape)) if integer else rng.normal(size=(n, *shape))
    y = np.arange(n) % CLASSES
    return x.astype(np.int32 if integer else np.float32), y, None, np.arange(offset, offset + n)

  vocabulary = tuple(f"w{i}" for i in range(30)) if integer else ()
  return data.from_arrays(split(24, 0), split(12, 100), split(12, 200), num_classes=CLASSES, vocabulary=vocabulary)


def _methods(model) -> dict[str, core.Method]:
  loss_fn = persample.softmax_cross_entropy
  features = mts.concat_features(mts.loss_features(model, loss_fn), mts.position_features(model, loss_fn, CLASSES, knn=3))
  return {
      "uniform": core.uniform(),
      "l2rw": mts.l2rw(model, loss_fn),
      "mwn": mts.mwn(model, loss_fn),
      "mts": mts.mts(model, loss_fn, features, meta_net=mts.MetaNet((8,), num_classes=CLASSES)),
      "mts-online": mts.mts(model, loss_fn, features, meta_net=mts.MetaNet((8,)), lookahead=False),
      "dvn": dvn.dvn(model, loss_fn, period=2, num_samples=4),
      "grad-norm": dvn.grad_norm_sampler(model, loss_fn),
  }


@pytest.mark.parametrize("name", [name for name in NAMES if name != "grouped-conv"])  # the five kinds of model
def test_fit_runs_every_method_on_the_model(name):
  case = ZOO[name]
  dataset = _dataset(case)
  params = case.params if name == "function" else None
  for method_name, method in _methods(case.model).items():
    result = train.fit(case.model, dataset, CONFIG, method, params=params)
    record = result.history[-1]
    assert np.isfinite(record["train/loss"]), (name, method_name)
    assert 0.0 <= record["test/accuracy"] <= 1.0
    assert jax.tree.structure(result.state.params) == jax.tree.structure(case.params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), result.state.params, case.params)
    assert any(jax.tree.leaves(changed)), (name, method_name)


@pytest.mark.parametrize("name", ["nnx-mlp", "function"])
def test_controllers_train_users_models(name):
  """The controllers that touch the model (rescoring's pool refresh) or re-draw the batch (importance sampling)
  train an NNX module and a plain function as they train metasel's models."""
  case = ZOO[name]
  dataset = _dataset(case)
  params = case.params if name == "function" else None
  methods = {
      "rescoring-refresh": controllers.rescoring(total_steps=6, refresh_every=2, model=case.model),
      "importance": controllers.importance_sampling(4, threshold=1.0),
  }
  for method_name, method in methods.items():
    result = train.fit(case.model, dataset, CONFIG, method, params=params)
    assert np.isfinite(result.history[-1]["train/loss"]), (name, method_name)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), result.state.params, case.params)
    assert any(jax.tree.leaves(changed)), (name, method_name)


def test_fit_takes_any_optax_optimiser_and_schedule():
  case = ZOO["linen-mlp"]
  dataset = _dataset(case)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)
  for optimizer in (optax.adamw(1e-2), optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))):
    config = train.TrainConfig(epochs=2, batch_size=8, val_batch_size=6, optimizer=optimizer)
    result = train.fit(case.model, dataset, config)
    assert np.isfinite(result.history[-1]["train/loss"])
  with pytest.raises(ValueError, match="learning_rate applies to a named optimizer"):
    dataclasses.replace(CONFIG, optimizer=optax.sgd(0.1)).check(dataset)


def test_named_optimisers_share_one_compiled_epoch_across_learning_rates():
  case = ZOO["linen-mlp"]
  dataset = _dataset(case)
  jax.clear_caches()
  for rate in (1e-2, 3e-2):
    train.fit(case.model, dataset, train.TrainConfig(epochs=1, batch_size=8, val_batch_size=6, learning_rate=rate))
  assert train._fit_epoch._cache_size() == 1
  state = train.make_optimizer("adam", 3e-2).init(case.params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-2)


def test_fit_refuses_a_model_with_batch_statistics_before_training():
  class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(CLASSES)(nn.BatchNorm(use_running_average=True)(x))

  with pytest.raises(ValueError, match=r"collection\(s\) \['batch_stats'\]"):
    train.fit(WithBatchNorm(), _dataset(ZOO["linen-mlp"]), CONFIG)


def test_tracker_is_optional():
  case = ZOO["linen-mlp"]
  off = train.fit(case.model, _dataset(case), train.TrainConfig(epochs=1, batch_size=8, val_batch_size=6, track_dynamics=False))
  assert off.state.tracker is None
  on = train.fit(case.model, _dataset(case), CONFIG)
  assert int(on.state.tracker.count.sum()) == 24  # one epoch of three batches of 8


def test_nnx_fit_starts_from_the_modules_own_parameters():
  case = ZOO["nnx-mlp"]
  config = train.TrainConfig(epochs=1, batch_size=8, val_batch_size=6, optimizer="sgd", learning_rate=1e-9)
  result = train.fit(case.model, _dataset(case), config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), result.state.params, case.params)


def test_method_weights_of_the_wrong_shape_are_rejected():
  bad = core.Method(
      init=lambda key, n: (), weights=lambda state, ctx: (jnp.ones(3) / 3, (), {}), update=core.keep_state, name="bad"
  )
  with pytest.raises(ValueError, match=r"method bad returned weights of shape \(3,\); expected \(8,\)"):
    train.fit(ZOO["linen-mlp"].model, _dataset(ZOO["linen-mlp"]), CONFIG, bad)


def test_importing_the_methods_does_not_import_the_training_loop():
  code = "import sys, metasel.mts, metasel.dvn; assert 'metasel.train' not in sys.modules, sorted(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_a_module_with_unhashable_attributes_trains_and_shares_its_programs():
  case = ZOO["linen-mlp"]
  from metasel import models

  model = models.MLP(hidden=[16, 8], num_outputs=CLASSES)  # a list attribute: the module cannot be hashed
  assert models.as_model(model) == models.as_model(model)
  assert models.as_model(model) != models.as_model(models.MLP(hidden=[16, 8], num_outputs=CLASSES))
  result = train.fit(model, _dataset(case), CONFIG)
  assert np.isfinite(result.history[-1]["train/loss"])
