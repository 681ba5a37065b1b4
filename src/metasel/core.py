"""The protocol every data-selection method speaks with the training loop: `Method`, `Batch`, `StepContext`, `StepResult`.

A method is a small record of pure functions over its own state, in the optax manner. In each step
the loop shows it a `StepContext`; `weights` returns the batch's weights and whatever the method
wants to carry to `update`; the loop takes its optimiser step with those weights; `update` sees the
outcome (`StepResult`) and makes the step's one state transition:

    weights, carry, metrics = method.weights(state, ctx)
    result = loop's weighted step
    state, metrics = method.update(state, ctx, result, carry)

Methods import this module, never the loop (`metasel.train`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metasel.tape import Tape

__all__ = [
    "Batch", "StepContext", "StepResult", "Method", "Metrics", "uniform", "uniform_weights", "keep_state",
    "weight_diagnostics", "validation_rows", "with_validation_batch",
]

Metrics = dict[str, jax.Array]  # scalar metrics, the same keys every step


class Batch(NamedTuple):
  """A training batch: pool indices (B,), inputs (B, ...), targets (B,), real/synthetic groups (B,) or None."""

  indices: jax.Array
  x: jax.Array
  y: jax.Array
  groups: jax.Array | None = None


class StepContext(NamedTuple):
  """What a method may look at in one step: the model params, the batch, a clean validation batch, a key.

  The loop also fills in its own forward pass on the batch at `params` (per-sample `losses` (B,),
  `outputs` (B, O) and `embeddings` (B, D)), so methods need not run the model again for them, the
  whole training pool (`train_x` (N, ...), `train_y` (N,)) for methods that score or probe it, and the
  batch's `tape` at `params` (every taped layer's input rows and per-sample loss-to-output gradients),
  which costs nothing beyond the forward pass unless a method reads its gradients. `val_split` (the whole
  validation split) and `val_key` (the key of this step's validation rows) let a method that needs the
  validation batch only on some steps draw and gather it inside its own branch (`with_validation_batch`).
  """

  params: Any
  batch: Batch
  val_x: jax.Array
  val_y: jax.Array
  key: jax.Array
  losses: jax.Array | None = None
  outputs: jax.Array | None = None
  embeddings: jax.Array | None = None
  train_x: jax.Array | None = None
  train_y: jax.Array | None = None
  tape: Tape | None = None
  val_split: tuple[jax.Array, jax.Array] | None = None
  val_key: jax.Array | None = None


def validation_rows(key: jax.Array, num_rows: int, size: int) -> jax.Array:
  """A step's validation rows (size,): drawn from the split's `num_rows` without replacement."""
  return jax.random.choice(key, num_rows, (size,), replace=False)


def with_validation_batch(ctx: StepContext) -> StepContext:
  """`ctx` with its validation batch drawn and gathered here from `val_split` (the same rows as `ctx.val_x`).

  Called inside a `lax.cond` branch, the draw and the gather run only on the steps the branch runs, and
  the loop's own are compiled away when nothing else reads `ctx.val_x`.
  """
  if ctx.val_split is None or ctx.val_key is None:
    return ctx
  val_x, val_y = ctx.val_split
  rows = validation_rows(ctx.val_key, val_x.shape[0], ctx.val_x.shape[0])
  return ctx._replace(val_x=val_x[rows], val_y=val_y[rows])


class StepResult(NamedTuple):
  """What a method learns from the model's step.

  Attributes:
    losses: per-sample losses (B,) before the step.
    params: the model's params after the step.
    weight_vjp: `cotangent on params -> (B,)`: how the new params depend on each sample's weight; with
      the gradient of a validation loss at `params` it gives d L_val(params) / d w_i exactly, for the
      loop's own optimiser and its state.
    tape: the step's `tape.Tape` at the params before the step, from its own forward and backward
      pass: every taped layer's per-sample input rows and loss-to-output gradients (per unit weight;
      zero for a sample of weight zero), from which per-sample gradient norms and dot products follow.
  """

  losses: jax.Array
  params: Any
  weight_vjp: Callable[[Any], jax.Array]
  tape: Tape | None = None


class Method(NamedTuple):
  """A data-selection method as pure functions over its state.

  Attributes:
    init: `(key, num_train) -> state`.
    weights: `(state, ctx) -> (weights (B,), carry, metrics)`: non-negative per-sample weights summing to
      one for the model's step (importance weights that make the step unbiased sum to one in expectation), anything `update` needs from this step (any pytree, e.g. `()`), and
      scalar metrics to log. It does not change the state.
    update: `(state, ctx, result, carry) -> (state, metrics)`: the step's one state transition, after the
      model's step; returns the state in the structure `init` gives.
    probs: optional `state -> (N,)` sampling distribution over the training pool; when absent the loop
      walks the pool in uniformly shuffled epochs.
    name: label used in logs.
  """

  init: Callable[[jax.Array, int], Any]
  weights: Callable[[Any, StepContext], tuple[jax.Array, Any, Metrics]]
  update: Callable[[Any, StepContext, StepResult, Any], tuple[Any, Metrics]]
  probs: Callable[[Any], jax.Array] | None = None
  name: str = "method"


def uniform_weights(size: int) -> jax.Array:
  """Every sample of a batch of `size` weighted 1 / size."""
  return jnp.full((size,), 1.0 / size, jnp.float32)


def keep_state(state, ctx, result, carry):
  """An `update` for methods whose state never changes."""
  return state, {}


_UNIFORM = Method(
    init=lambda key, num_train: (),
    weights=lambda state, ctx: (uniform_weights(ctx.batch.y.shape[0]), (), {}),
    update=keep_state,
    name="uniform",
)


def uniform() -> Method:
  """Every sample of a batch weighted 1/B, batches drawn as shuffled epochs: plain training.

  Always the same record, so that runs with it share their compiled epochs.
  """
  return _UNIFORM


def weight_diagnostics(weights: jax.Array) -> Metrics:
  """Effective batch size 1/sum p_i^2, max p_i and Var(p_i) of weights p (B,); importance weights, which sum to
  one only in expectation, are taken as they are."""
  return {
      "effective_batch_size": 1.0 / jnp.sum(jnp.square(weights)),
      "max_weight": jnp.max(weights),
      "weight_var": jnp.var(weights),
  }
