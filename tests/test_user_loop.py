"""The public step in a user's own loop: the same numbers as `fit`, one compile, streamed candidate batches, bad input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import blobs, method_families

from metasel import core, data, dvn, influence, models, mts, persample, selection, train

LOSS = persample.softmax_cross_entropy
CONFIG = train.TrainConfig(epochs=1, batch_size=8, val_batch_size=8, learning_rate=1e-2, seed=3, track_dynamics=False)
DATASET = blobs(48)
MODEL = models.MLP((8,), num_outputs=3)
FAMILIES = method_families(MODEL, LOSS, 3, num_train=48, batch_size=8)


def _user_loop(method: core.Method):
  """`fit`'s first epoch, rebuilt as a user would write it: their jit, their batches, their keys; states and metrics."""
  arrays = [jnp.asarray(a) for a in (DATASET.train.x, DATASET.train.y, DATASET.val.x, DATASET.val.y)]
  train_x, train_y, val_x, val_y = arrays
  step = train.make_step(MODEL, LOSS, train.make_optimizer("adam", CONFIG.learning_rate), method, num_train=48)
  init_key, method_key, loop_key, order_key = jax.random.split(jax.random.key(CONFIG.seed), 4)
  state = step.init(method_key, models.init(MODEL, init_key, DATASET.input_shape))
  one_step = jax.jit(step.step)
  key, metrics = loop_key, []
  for rows in data.epoch_batches(jax.random.fold_in(order_key, 0), 48, CONFIG.batch_size):
    key, batch_key, val_key, step_key = jax.random.split(key, 4)
    if method.probs is not None:  # a sampler: the next batch is drawn from its distribution
      rows = data.weighted_batches(batch_key, method.probs(state.method_state), CONFIG.batch_size, 1)[0]
    val_rows = core.validation_rows(val_key, val_x.shape[0], CONFIG.val_batch_size)
    batch = core.Batch(rows, train_x[rows], train_y[rows])
    pool = (train_x, train_y) if method.needs_pool else None
    state, step_metrics = one_step(state, batch, (val_x[val_rows], val_y[val_rows]), step_key, pool=pool)
    metrics.append(step_metrics)
  return state, jax.tree.map(lambda *values: np.stack(values), *metrics)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_user_loop_gives_fits_params_and_metrics(name):
  method = FAMILIES[name]
  logged = []
  fitted = train.fit(MODEL, DATASET, CONFIG, method, log=logged.append)
  state, metrics = _user_loop(method)
  chex.assert_trees_all_close(state.params, fitted.state.params, rtol=1e-4, atol=1e-6)
  steps = [record for record in logged if "epoch" not in record]
  for key, values in metrics.items():
    np.testing.assert_allclose(values, [record[f"step/{key}"] for record in steps], rtol=1e-4, atol=1e-6, err_msg=key)


def test_methods_built_twice_are_equal_hashable_and_compile_once():
  again = method_families(MODEL, LOSS, 3, num_train=48, batch_size=8)
  x, y = jnp.asarray(DATASET.train.x[:8]), jnp.asarray(DATASET.train.y[:8])
  batch, val_batch = core.Batch(jnp.arange(8), x, y), (x, y)
  pool = (jnp.asarray(DATASET.train.x), jnp.asarray(DATASET.train.y))
  params = models.init(MODEL, jax.random.key(0), DATASET.input_shape)
  tx = optax.sgd(0.1)  # one optimiser object: optax transformations compare by identity
  for name, method in FAMILIES.items():
    assert method == again[name] and hash(method) == hash(again[name]), name

    def run(step, state):
      return step.step(state, batch, val_batch, jax.random.key(1), pool=pool if step.method.needs_pool else None)

    chex.clear_trace_counter()  # chex counts traces per function's code, shared by the loop's `run`s
    traced_once = jax.jit(chex.assert_max_traces(run, n=1))
    for built in (method, again[name]):
      step = train.make_step(MODEL, LOSS, tx, built, num_train=48)
      traced_once(step, step.init(jax.random.key(2), params))  # a second trace raises


def _stream(rng: np.random.Generator, size: int, dim: int = 5):
  """A loader that never holds a pool: fresh candidate batches of `size` blobs, forever."""
  centres = np.random.default_rng(0).normal(size=(3, dim)) * 3
  while True:
    y = rng.integers(0, 3, size)
    x = (centres[y] + rng.normal(size=(size, dim))).astype(np.float32)
    yield core.Batch(np.zeros(size, np.int32), x, y.astype(np.int32))


@pytest.mark.parametrize("select", ["greats", "lai-sign"])
def test_selection_on_streamed_candidate_batches_never_puts_a_pool_on_device(select):
  """GREATS keeps B of each candidate batch of 2B; the step's only inputs are the state, that batch and the
  validation rows, as its jaxpr shows."""
  b = 8
  method = {
      "greats": selection.greats(influence.ghost_scorer(MODEL, LOSS), b, 0.1),
      "lai-sign": selection.sign_drop(influence.lai_scorer(MODEL, LOSS)),
  }[select]
  step = train.make_step(MODEL, LOSS, optax.adam(1e-2), method)  # no num_train: a stream with no pool
  stream, val = _stream(np.random.default_rng(1), 2 * b), next(_stream(np.random.default_rng(2), 12))
  first = next(stream)
  params = models.init(MODEL, jax.random.key(0), (5,))
  state = step.init(jax.random.key(1), params, batch=first)
  val_batch = (val.x, val.y)
  jaxpr = jax.make_jaxpr(step.step)(state, first, val_batch, jax.random.key(2))
  expected = jax.tree.leaves((state, first, val_batch, jax.random.key(2)))
  assert [v.aval.shape for v in jaxpr.jaxpr.invars] == [jnp.shape(leaf) for leaf in expected]
  assert max(v.aval.shape[0] for v in jaxpr.jaxpr.invars if v.aval.shape) <= max(2 * b, 12)
  one_step = jax.jit(step.step)
  for i, batch in zip(range(4), stream):
    state, metrics = one_step(state, batch, val_batch, jax.random.key(10 + i))
    if select == "greats":
      assert float(metrics["selecting"]) == 1.0 and float(metrics["drop_rate"]) == pytest.approx(0.5)
  assert state.method_state.seen.shape == (0,)  # no per-sample table without a pool
  assert any(bool(jnp.any(a != b_)) for a, b_ in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))


def test_bad_input_to_the_step_is_refused_before_compute():
  x, y = jnp.asarray(DATASET.train.x), jnp.asarray(DATASET.train.y)
  params = models.init(MODEL, jax.random.key(0), DATASET.input_shape)
  first = core.Batch(jnp.arange(8), x[:8], y[:8])
  plain = train.make_step(MODEL, LOSS, optax.sgd(0.1))
  state = plain.init(jax.random.key(1), params, batch=first)
  with pytest.raises(ValueError, match="expected those of the first batch"):
    plain.step(state, core.Batch(jnp.arange(6), x[:6], y[:6]), None, jax.random.key(2))
  with pytest.raises(ValueError, match="batch.x has shape"):
    plain.step(state, core.Batch(jnp.arange(8), x[:6], y[:8]), None, jax.random.key(2))
  meta = train.make_step(MODEL, LOSS, optax.sgd(0.1), mts.mts(MODEL, LOSS, mts.loss_features(MODEL, LOSS)))
  with pytest.raises(ValueError, match=r"reads a clean validation batch; expected val_batch=\(val_x, val_y\)"):
    meta.step(meta.init(jax.random.key(1), params), first, None, jax.random.key(2))
  sampler = dvn.dvn(MODEL, LOSS, num_samples=4)
  with pytest.raises(ValueError, match="scores or probes the whole training pool; expected num_train"):
    train.make_step(MODEL, LOSS, optax.sgd(0.1), sampler)
  probing = train.make_step(MODEL, LOSS, optax.sgd(0.1), sampler, num_train=48)
  with pytest.raises(ValueError, match="scores or probes the whole training pool"):
    probing.step(probing.init(jax.random.key(1), params), first, (x[:8], y[:8]), jax.random.key(2))
  with pytest.raises(ValueError, match="expected num_train=48 of each"):
    probing.step(probing.init(jax.random.key(1), params), first, (x[:8], y[:8]), jax.random.key(2), pool=(x[:40], y[:40]))
  top = train.make_step(MODEL, LOSS, optax.sgd(0.1), selection.top_k(influence.ghost_scorer(MODEL, LOSS), 8))
  with pytest.raises(ValueError, match="the candidate batch has only 4 samples"):
    top.step(top.init(jax.random.key(1), params), core.Batch(jnp.arange(4), x[:4], y[:4]), (x[:8], y[:8]), jax.random.key(2))
