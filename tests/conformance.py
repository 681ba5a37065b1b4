"""The check every `core.Method` passes under jit, and the small data and step contexts the method tests share.

`check_method` asserts: one step's jitted weights are finite, non-negative and sum to one (or, for
importance weights, `normalised=False`, sum to a finite positive number), with finite
metrics; two compiled epochs (`train.make_epoch` of `train.make_step`) keep the method state's structure, shapes and dtypes,
with finite step metrics; and the epoch compiles once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasel import controllers, core, data, dvn, influence, models, mts, persample, selection, signals, train


def blobs(n: int = 96, seed: int = 0, classes: int = 3, dim: int = 5) -> data.Dataset:
  """Gaussian blobs: `n` training and 32 validation and test samples of `dim` features in `classes` classes."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, dim)) * 3

  def split(m):
    y = rng.integers(0, classes, m)
    return (centres[y] + rng.normal(size=(m, dim))).astype(np.float32), y.astype(np.int32)

  return data.from_arrays(split(n), split(32), split(32), num_classes=classes)


def pool(dataset: data.Dataset, groups: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """The loop's `data`: (train_x, train_y, val_x, val_y[, groups]) as device arrays."""
  arrays = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  return arrays + (() if groups is None else (jnp.asarray(groups),))


def step_context(model, loss_fn, params, arrays: tuple[jax.Array, ...], rows, val_size: int, key) -> core.StepContext:
  """The context of a step on the pool `rows`, filled as the training loop fills it (losses, outputs,
  embeddings, the pool and the batch's tape), with the first `val_size` validation rows."""
  train_x, train_y, val_x, val_y, *groups = arrays
  rows = jnp.asarray(rows)
  batch = core.Batch(rows, train_x[rows], train_y[rows], groups[0][rows] if groups else None)
  recorded = persample.record(model, params, batch.x, batch.y, loss_fn)
  return core.StepContext(
      params, batch, val_x[:val_size], val_y[:val_size], key, recorded.losses, recorded.outputs,
      recorded.embeddings, (train_x, train_y), recorded,
  )


class Checked(NamedTuple):
  """What `check_method` ran: the loop state before, after one and after two epochs, and the last step metrics."""

  initial: train.LoopState
  first: train.LoopState
  second: train.LoopState
  step_metrics: dict[str, Any]


def shapes(tree) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype]]]:
  """A pytree's structure and its leaves' shapes and dtypes."""
  return jax.tree.structure(tree), [(np.shape(a), np.asarray(a).dtype) for a in jax.tree.leaves(tree)]


def check_method(
    method: core.Method, model, loss_fn, dataset: data.Dataset, *, groups=None, batch_size: int = 16,
    learning_rate: float = 1e-2, normalised: bool = True,
) -> Checked:
  """Assert the conformance of `method` on `model` and `dataset` (see the module docstring); returns the states."""
  num_train = len(dataset.train)
  tx = train.make_optimizer("adam", learning_rate)
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  arrays = pool(dataset, groups)
  state = train.LoopState(
      params, tx.init(params), method.init(jax.random.key(1), num_train), signals.tracker_init(num_train),
      jnp.zeros((), jnp.int32), jax.random.key(2),
  )
  # Weights of one step, under jit: finite, non-negative, summing to one.
  ctx = step_context(model, loss_fn, params, arrays, np.arange(batch_size), batch_size, jax.random.key(4))
  weights, _, metrics = jax.jit(method.weights)(state.method_state, ctx)
  assert weights.shape == (batch_size,)
  assert np.all(np.isfinite(weights)) and np.all(np.asarray(weights) >= 0)
  if normalised:
    np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, rtol=1e-5)
  else:
    assert float(jnp.sum(weights)) > 0
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
  # Two compiled epochs: finite metrics, and the method state keeps its structure, shapes and dtypes.
  step = train.make_step(model, loss_fn, tx, method, num_train=num_train, track_dynamics=True)
  epoch = jax.jit(train.make_epoch(step, batch_size))
  batches = jnp.arange(num_train - num_train % batch_size).reshape(-1, batch_size)
  first, step_metrics = epoch(state, arrays, batches)
  second, _ = epoch(first, arrays, batches)
  assert shapes(first.method_state) == shapes(state.method_state) == shapes(second.method_state)
  for key, value in step_metrics.items():
    assert np.all(np.isfinite(value)), key
  if normalised:
    np.testing.assert_allclose(step_metrics["effective_batch_size"] >= 1, True)
  assert epoch._cache_size() == 1
  return Checked(state, first, second, jax.device_get(step_metrics))


def method_families(model, loss_fn, num_classes: int, *, num_train: int, batch_size: int) -> dict[str, Any]:
  """One method of every family the library ships, built for `model`: the shared conformance list."""
  ghost = influence.ghost_scorer(model, loss_fn)
  lai = influence.lai_scorer(model, loss_fn)
  features = mts.concat_features(mts.loss_features(model, loss_fn), mts.position_features(model, loss_fn, num_classes, knn=3))
  drop = np.arange(num_train) % 5 == 0
  return {
      "uniform": core.uniform(),
      "l2rw": mts.l2rw(model, loss_fn),
      "mwn": mts.mwn(model, loss_fn),
      "mts": mts.mts(model, loss_fn, features, meta_net=mts.MetaNet((8,))),
      "mts-online": mts.mts(model, loss_fn, features, meta_net=mts.MetaNet((8,)), lookahead=False),
      "dvn": dvn.dvn(model, loss_fn, period=2, num_samples=4),
      "grad-norm": dvn.grad_norm_sampler(model, loss_fn),
      "lai-sign": selection.sign_drop(lai),
      "ghost-top-k": selection.top_k(ghost, batch_size // 2),
      "greats": selection.greats(ghost, batch_size // 2, 0.1),
      "spl": selection.self_paced(model, loss_fn),
      "random-drop": selection.random_drop(0.25),
      "oracle": selection.oracle(drop),
      "curriculum": controllers.curriculum(np.arange(num_train, dtype=np.float64), ramp_steps=4),
      "rescoring": controllers.rescoring(total_steps=8, refresh_every=2, model=model),
      "importance": controllers.importance_sampling(batch_size // 2, threshold=1.0),
      "loss-weighting": controllers.loss_weighting(2.0),
      "infobatch": controllers.infobatch(total_steps=8, pass_steps=4),
  }
