"""The shared training loop: it learns, logs, samples from a method's probabilities, and stops on NaN."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metasel import core, models, runs, signals, train
from metasel.data import Dataset, Split


def _blobs(seed: int = 0, n: int = 256, dim: int = 5) -> Dataset:
  """Two well separated Gaussian classes; half the train labels of tier 1 are flipped."""
  rng = np.random.default_rng(seed)

  def split(size):
    y = rng.integers(0, 2, size).astype(np.int32)
    x = (rng.normal(size=(size, dim)) + 2.0 * (2 * y[:, None] - 1)).astype(np.float32)
    return Split(x, y, np.zeros(size, np.int32))

  tr = split(n)
  tier = (np.arange(n) % 8 == 0).astype(np.int32)
  y = np.where(tier == 1, 1 - tr.y, tr.y).astype(np.int32)
  return Dataset(
      "blobs", Split(tr.x, y, tier), split(64), split(64), 2, tuple(f"f{i}" for i in range(dim)), ("clean", "flipped")
  )


CONFIG = train.TrainConfig(epochs=4, batch_size=32, val_batch_size=16, learning_rate=1e-2, seed=0)
MODEL = models.MLP((16,), num_outputs=2)


def test_uniform_training_learns_and_logs(tmp_path):
  log = runs.MetricsLog(tmp_path / "metrics.jsonl")
  result = train.fit(MODEL, _blobs(), CONFIG, log=log.write)
  first, last = result.history[0], result.history[-1]
  assert last["test/accuracy"] > 0.9  # separable blobs; chance is 0.5
  assert last["train/mean_loss"] < first["train/mean_loss"]
  assert int(result.state.step) == CONFIG.epochs * (256 // 32)
  lines = log.read()
  assert [r["epoch"] for r in lines if "epoch" in r] == [1, 2, 3, 4]
  assert len([r for r in lines if "step/loss" in r]) == CONFIG.epochs * 8
  step_line = next(r for r in lines if "step/loss" in r)
  assert step_line["step/effective_batch_size"] == pytest.approx(32.0)  # uniform weights
  assert step_line["step/max_weight"] == pytest.approx(1 / 32)


def test_tracker_sees_every_sample_once_per_epoch():
  result = train.fit(MODEL, _blobs(), CONFIG)
  counts = np.asarray(result.state.tracker.count)
  np.testing.assert_array_equal(counts, np.full(256, CONFIG.epochs))


def test_same_seed_same_numbers_other_seed_differs():
  a = train.fit(MODEL, _blobs(), CONFIG).history[-1]
  b = train.fit(MODEL, _blobs(), CONFIG).history[-1]
  c = train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, seed=1)).history[-1]
  assert a == b
  assert a["train/mean_loss"] != c["train/mean_loss"]


def _only_first_half() -> core.Method:
  """A sampler that puts all probability on the first half of the pool."""

  def probs(state):
    return state

  return core.Method(
      init=lambda key, n: jnp.where(jnp.arange(n) < n // 2, 2.0 / n, 0.0),
      weights=lambda state, ctx: (jnp.full(ctx.batch.y.shape, 1.0 / ctx.batch.y.shape[0]), (), {}),
      update=core.keep_state,
      probs=probs,
      name="first-half",
  )


def test_method_probabilities_drive_sampling():
  result = train.fit(MODEL, _blobs(), CONFIG, method=_only_first_half())
  counts = np.asarray(result.state.tracker.count)
  assert counts[128:].sum() == 0
  assert counts[:128].sum() == CONFIG.epochs * 8 * 32


def test_epoch_jit_equals_eager():
  dataset = _blobs()
  tx = train.make_optimizer("sgd", 0.1)
  epoch = train.make_epoch(train.make_step(MODEL, train.loss_fn_for(dataset), tx, num_train=256, track_dynamics=True), 16)
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  state = train.LoopState(params, tx.init(params), (), signals.tracker_init(256), jnp.zeros((), jnp.int32), jax.random.key(1))
  data = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  batches = jnp.arange(96).reshape(3, 32)
  jitted_state, jitted_metrics = jax.jit(epoch)(state, data, batches)
  with jax.disable_jit():
    eager_state, eager_metrics = epoch(state, data, batches)
  for a, b in zip(jax.tree.leaves((jitted_state.params, jitted_metrics)), jax.tree.leaves((eager_state.params, eager_metrics))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_stops_training_with_clear_error(tmp_path):
  nan_weights = core.Method(
      init=lambda key, n: (),
      weights=lambda state, ctx: (jnp.full(ctx.batch.y.shape, jnp.nan), (), {}),
      update=core.keep_state,
  )
  log = runs.MetricsLog(tmp_path / "metrics.jsonl")
  with pytest.raises(FloatingPointError, match="non-finite at step 1 .epoch 1."):
    train.fit(MODEL, _blobs(), CONFIG, method=nan_weights, log=log.write)
  assert any(r.get("epoch") == 1 for r in log.read())  # what ran is still on disk


@pytest.mark.parametrize(
    "change,message",
    [
        ({"batch_size": 1000}, "batch_size=1000 is larger than the training split .256 samples."),
        ({"val_batch_size": 65}, "val_batch_size=65 is larger than the validation split"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"optimizer": "lbfgs"}, r"unknown optimizer 'lbfgs'; expected one of \('sgd', 'momentum', 'adam'\)"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive finite number, got -1.0"),
    ],
)
def test_bad_settings_fail_before_compute(change, message):
  with pytest.raises(ValueError, match=message):
    train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, **change))


def test_non_finite_features_fail_before_compute():
  dataset = _blobs()
  x = dataset.train.x.copy()
  x[3, 1] = np.inf
  bad = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train, x=x))
  with pytest.raises(ValueError, match=r"train features: 1 NaN or inf values \(first: row 3, column 1\); expected finite values"):
    train.fit(MODEL, bad, CONFIG)


def test_resumed_run_ends_with_the_same_numbers(tmp_path):
  dataset = _blobs()
  uninterrupted = train.fit(MODEL, dataset, CONFIG)
  train.fit(MODEL, dataset, dataclasses.replace(CONFIG, epochs=2), checkpoint_dir=tmp_path / "ckpt")
  resumed = train.fit(MODEL, dataset, CONFIG, checkpoint_dir=tmp_path / "ckpt")
  assert resumed.history == uninterrupted.history
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(uninterrupted.state.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(resumed.state.tracker.count, uninterrupted.state.tracker.count)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
  train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, epochs=1), checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="expected the same settings"):
    train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, learning_rate=0.5), checkpoint_dir=tmp_path)


def _counting_visits() -> core.Method:
  """A method whose `weights` hands the batch's indices to `update` as its carry; `update` counts the visits."""

  def weights(state, ctx):
    return core.uniform_weights(ctx.batch.y.shape[0]), ctx.batch.indices, {"seen": jnp.sum(state).astype(jnp.float32)}

  def update(state, ctx, result, carry):
    return state.at[carry].add(1), {"visited": jnp.sum(state.at[carry].add(1)).astype(jnp.float32)}

  return core.Method(init=lambda key, n: jnp.zeros(n, jnp.int32), weights=weights, update=update, name="counting")


def test_update_receives_the_carry_of_weights_and_makes_the_one_state_transition():
  result = train.fit(MODEL, _blobs(), CONFIG, method=_counting_visits())
  visits = np.asarray(result.state.method_state)
  np.testing.assert_array_equal(visits, np.full(256, CONFIG.epochs))  # one update per step, with that step's batch
  np.testing.assert_array_equal(visits, np.asarray(result.state.tracker.count))
  # `weights` saw the state before the step's update, `update` the state after it: 32 samples apart.
  assert result.history[0]["train/visited"] - result.history[0]["train/seen"] == pytest.approx(32.0)
  # the method's carry does not change the training itself
  plain = train.fit(MODEL, _blobs(), CONFIG)
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(plain.state.params)):
    np.testing.assert_array_equal(a, b)


def test_training_without_dynamics_has_no_tracker_and_the_same_params():
  tracked = train.fit(MODEL, _blobs(), CONFIG)
  untracked = train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, track_dynamics=False))
  assert untracked.state.tracker is None
  assert untracked.history == tracked.history
  for a, b in zip(jax.tree.leaves(untracked.state.params), jax.tree.leaves(tracked.state.params)):
    np.testing.assert_array_equal(a, b)


def test_named_optimizer_keeps_its_learning_rate_in_its_state():
  params = models.init(MODEL, jax.random.key(0), (5,))
  assert float(train.make_optimizer("sgd", 0.25).init(params).hyperparams["learning_rate"]) == 0.25
  assert float(train.make_optimizer("adam").init(params).hyperparams["learning_rate"]) == pytest.approx(1e-3)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = train.make_optimizer("sgd", 0.25)
  updates, _ = tx.update(grads, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -0.25)


def test_an_optax_transformation_trains_like_the_named_optimizer():
  named = train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, optimizer="sgd", learning_rate=0.1))
  custom = train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, optimizer=optax.sgd(0.1), learning_rate=None))
  for a, b in zip(jax.tree.leaves(custom.state.params), jax.tree.leaves(named.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert custom.history[-1]["test/accuracy"] > 0.9


def test_an_optax_transformation_takes_no_learning_rate():
  with pytest.raises(ValueError, match="expected learning_rate=None"):
    train.fit(MODEL, _blobs(), dataclasses.replace(CONFIG, optimizer=optax.sgd(0.1), learning_rate=0.1))
  with pytest.raises(ValueError, match="optimizer must be one of .* or an optax GradientTransformation"):
    train.make_optimizer(42)
