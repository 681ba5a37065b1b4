"""The training step every data-selection method runs in: data in, data out, jitted by the caller.

`make_step(model, loss_fn, optimizer, method)` gives a `Step`, a frozen record of the step's static
configuration (equal settings give equal, hashable steps, so `jax.jit` compiles one program for them).
`Step.init(key, params)` makes its `TrainState`; `Step.step(state, batch, val_batch, key)` takes one
optimiser step on whatever batch the caller's loader produced:

    step = train.make_step(model, loss_fn, optax.adam(1e-3), mts.mts(model, loss_fn, features))
    state = step.init(jax.random.key(0), params)
    state, metrics = jax.jit(step.step)(state, batch, (val_x, val_y), key)

One forward pass at the current params serves the method (losses, outputs, embeddings, the tape) and
the weighted gradient; the method weights the batch, the optimiser steps, and the method makes its
state transition seeing how the new params depend on each sample's weight. `train.fit` is a loop
over this step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metasel import checks, core, parallel, persample, records, signals, tape
from metasel.adapters import Model, ModelLike, as_model
from metasel.numerics import safe_divide

__all__ = ["Step", "TrainState", "BatchSpec", "make_step"]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The shapes and dtypes of a step's batch (indices, x, y, groups), recorded from the first one; no arrays."""

  shapes: tuple[tuple[int, ...] | None, ...]
  dtypes: tuple[str | None, ...]

  @classmethod
  def of(cls, batch: core.Batch) -> BatchSpec:
    return cls(
        tuple(None if a is None else tuple(jnp.shape(a)) for a in batch),
        tuple(None if a is None else str(jnp.result_type(a)) for a in batch),
    )


jax.tree_util.register_static(BatchSpec)


class TrainState(NamedTuple):
  """What a `Step` carries from one step to the next (tracker None when off; batch_spec None when unchecked)."""

  params: Any
  opt_state: Any
  method_state: Any
  tracker: signals.TrackerState | None
  step: jax.Array
  batch_spec: BatchSpec | None = None


@dataclasses.dataclass(frozen=True)
class Step:
  """One training step of `method` on `model`, as pure functions of the state and the data (see `make_step`).

  Equal settings give equal steps. A step is a pytree whose leaves are its method's per-run arrays (a
  mask, a table), so a program taking it as an argument compiles once for steps that differ only in them.
  """

  model: Model
  loss_fn: persample.LossFn
  optimizer: optax.GradientTransformation
  method: core.Method
  num_train: int | None = None
  track_dynamics: bool = False

  def init(self, key: jax.Array, params: Any, *, batch: core.Batch | None = None) -> TrainState:
    """The state before the first step: the optimiser's and the method's (with `key`), the tracker.

    With `batch` (e.g. the loader's first one), every later batch is checked to have its shapes.
    """
    tracker = signals.tracker_init(self.num_train) if self.track_dynamics else None
    return TrainState(
        params=params,
        opt_state=self.optimizer.init(params),
        method_state=self.method.init(key, self.num_train),
        tracker=tracker,
        step=jnp.zeros((), jnp.int32),
        batch_spec=None if batch is None else BatchSpec.of(batch),
    )

  def step(
      self, state: TrainState, batch: core.Batch, val_batch: tuple[jax.Array, jax.Array] | None, key: jax.Array,
      *, pool: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[TrainState, core.Metrics]:
    """One optimiser step on `batch`, weighted by the method, seeing `val_batch` `(x, y)` and `key`.

    `pool` `(x (N, ...), y (N,))` is the training pool, for a method that scores or probes it
    (`Method.needs_pool`); never needed otherwise. Returns the next state and scalar metrics.
    """
    check_inputs(self, state, batch, val_batch, pool)
    # The batch axis is split over the ambient data mesh (a no-op on one device); batch-level sums and
    # softmaxes then run over the global batch, with the all-reduces inserted by jit's partitioner.
    batch = parallel.constrain_rows(batch, "batch_size")
    val_x, val_y = (None, None) if val_batch is None else val_batch
    per_sample, pullback, fwd, batch_tape = _forward(self.model, self.loss_fn, state.params, batch)
    ctx = core.StepContext(
        state.params, batch, val_x, val_y, key, per_sample, fwd.outputs, fwd.embeddings, pool, batch_tape
    )
    weights, carry, weight_metrics = self.method.weights(state.method_state, ctx)
    _check_weights(weights, batch.y.shape[0], self.method)
    params, opt_state, result, (grads, updates) = _model_step(self.optimizer, state, pullback, fwd, per_sample, weights)
    method_state, update_metrics = self.method.update(state.method_state, ctx, result, carry)
    tracker = state.tracker
    if self.track_dynamics:
      classified = jnp.issubdtype(batch.y.dtype, jnp.integer)
      tracker = signals.tracker_update(
          tracker, batch.indices, per_sample, fwd.outputs if classified else None, batch.y if classified else None
      )
    metrics = {
        "loss": jnp.sum(weights * per_sample),
        "mean_loss": jnp.mean(per_sample),
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        **core.weight_diagnostics(weights),
        **weight_metrics,
        **update_metrics,
    }
    return TrainState(params, opt_state, method_state, tracker, state.step + 1, state.batch_spec), metrics


def _flatten_step(step: Step):
  return records.partition(tuple(getattr(step, field.name) for field in dataclasses.fields(step)))


def _unflatten_step(key, arrays) -> Step:
  return Step(*records.combine(list(arrays), key))


jax.tree_util.register_pytree_node(Step, _flatten_step, _unflatten_step)


def make_step(
    model: ModelLike,
    loss_fn: persample.LossFn,
    optimizer: optax.GradientTransformation,
    method: core.Method | None = None,
    *,
    num_train: int | None = None,
    track_dynamics: bool = False,
) -> Step:
  """The training step of `method` (uniform by default) on any Flax model with any optax optimiser.

  Args:
    model: a Flax linen or NNX module, an `apply(params, x)` function, or a `Model`.
    loss_fn: the per-sample loss `(outputs (B, O), targets (B,)) -> (B,)`.
    optimizer: the optax transformation the step applies to the weighted gradient.
    method: the data-selection method (`metasel.core.Method`).
    num_train: the pool size N the batches' indices address, for methods that keep a table over the
      pool or probe it, and for the tracker; None for a stream with no pool (such methods then refuse).
    track_dynamics: keep the per-sample training-dynamics tracker (`signals.tracker_update`); needs
      `num_train`.
  """
  method = method or core.uniform()
  checks.check_int("num_train", num_train, allow_none=True)
  if not isinstance(records.built_of(optimizer), optax.GradientTransformation):
    raise ValueError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
  if track_dynamics and num_train is None:
    raise ValueError("track_dynamics=True keeps a table over the pool; expected num_train, the pool size")
  if method.needs_pool and num_train is None:
    raise ValueError(
        f"method {method.name} scores or probes the whole training pool; expected num_train (the pool size),"
        " and the pool given to each step (pool=(x, y))"
    )
  return Step(as_model(model), loss_fn, optimizer, method, num_train, bool(track_dynamics))


def check_inputs(step: Step, state: TrainState, batch: Any, val_batch: Any, pool: Any) -> None:
  """Clear errors, at trace time and before any compute, for inputs the step cannot take."""
  if not isinstance(batch, core.Batch):
    raise ValueError(f"batch must be a metasel.core.Batch(indices, x, y, groups=None), got {type(batch).__name__}")
  size = jnp.shape(batch.y)[0] if jnp.ndim(batch.y) else None
  for name in ("indices", "x", "groups"):
    value = getattr(batch, name)
    if value is not None and (jnp.ndim(value) == 0 or jnp.shape(value)[0] != size):
      raise ValueError(f"batch.{name} has shape {jnp.shape(value)}; expected {size} rows, as batch.y has")
  if state.batch_spec is not None and BatchSpec.of(batch) != state.batch_spec:
    got, first = BatchSpec.of(batch), state.batch_spec
    raise ValueError(
        f"the batch has shapes {got.shapes} and dtypes {got.dtypes}; expected those of the first batch"
        f" (init's batch=): {first.shapes}, {first.dtypes}"
    )
  if val_batch is None and step.method.needs_validation:
    raise ValueError(
        f"method {step.method.name} reads a clean validation batch; expected val_batch=(val_x, val_y), got None"
    )
  if val_batch is not None and (not isinstance(val_batch, tuple) or len(val_batch) != 2):
    raise ValueError(f"val_batch must be a pair (val_x, val_y) or None, got {type(val_batch).__name__}")
  if step.method.needs_pool:
    if pool is None:
      core.check_pool(core.StepContext(None, batch, None, None, None), step.method.name)
    if jnp.shape(pool[0])[0] != step.num_train or jnp.shape(pool[1])[0] != step.num_train:
      raise ValueError(
          f"the pool has {jnp.shape(pool[0])[0]} inputs and {jnp.shape(pool[1])[0]} targets;"
          f" expected num_train={step.num_train} of each"
      )


def _forward(model: Model, loss_fn, params, batch: core.Batch):
  """Per-sample losses (B,), the weighted-loss pullback, the forward pass and its unit-weight tape.

  Its zero perturbations make the one backward pass also yield every taped layer's output gradients,
  which are compiled away unless the method reads them.
  """
  plan = tape.make_plan(model, params, batch.x)

  def forward(params, perturbations):
    fwd = tape.forward(model, params, batch.x, perturbations=perturbations, plan=plan)
    return loss_fn(fwd.outputs, batch.y), fwd

  per_sample, pullback, fwd = jax.vjp(forward, params, tape.zero_perturbations(plan), has_aux=True)
  batch_tape = tape.assemble(fwd, pullback(jnp.ones_like(per_sample))[1], per_sample)
  return per_sample, pullback, fwd, batch_tape


def _model_step(optimizer, state: TrainState, pullback, fwd, per_sample, weights):
  """The optimiser's step on sum_i w_i l_i, and the `StepResult` the method learns from.

  The step's VJP costs nothing unless the method asks how the new params depend on the weights.
  """

  def model_step(weights):
    grads, output_grads = pullback(weights)  # gradients of sum_i w_i l_i
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), (grads, updates, opt_state, output_grads)

  params, step_vjp, (grads, updates, opt_state, output_grads) = jax.vjp(model_step, weights, has_aux=True)
  step_tape = tape.assemble(fwd, _per_unit_weight(output_grads, weights), per_sample)
  result = core.StepResult(per_sample, params, lambda cotangent: step_vjp(cotangent)[0], step_tape)
  return params, opt_state, result, (grads, updates)


def _per_unit_weight(output_grads, weights: jax.Array):
  """Per-sample output gradients of the weighted loss divided by each weight w_i (zero where w_i = 0)."""
  scale = safe_divide(1.0, weights)  # (B,)
  return jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), output_grads)


def _check_weights(weights: jax.Array, size: int, method: core.Method) -> None:
  if jnp.shape(weights) != (size,):
    raise ValueError(f"method {method.name} returned weights of shape {jnp.shape(weights)}; expected ({size},)")
