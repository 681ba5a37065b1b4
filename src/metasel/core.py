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
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # the protocol names the tape's type only; it runs without Flax
  from metasel.tape import Tape

__all__ = [
    "Batch", "StepContext", "StepResult", "Method", "Metrics", "uniform", "uniform_weights", "keep_state", "no_state",
    "weight_diagnostics", "validation_rows", "check_pool",
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

  The step also fills in its own forward pass on the batch at `params` (per-sample `losses` (B,),
  `outputs` (B, O) and `embeddings` (B, D)), so methods need not run the model again for them, and
  the batch's `tape` at `params` (every taped layer's input rows and per-sample loss-to-output
  gradients), which costs nothing beyond the forward pass unless a method reads its gradients.
  `pool` is the training pool `(x (N, ...), y (N,))` the caller gave the step's `init`, for methods
  that score or probe it (`Method.needs_pool`); None otherwise, as for a streamed loader.
  """

  params: Any
  batch: Batch
  val_x: jax.Array
  val_y: jax.Array
  key: jax.Array
  losses: jax.Array | None = None
  outputs: jax.Array | None = None
  embeddings: jax.Array | None = None
  pool: tuple[jax.Array, jax.Array] | None = None
  tape: Tape | None = None


def validation_rows(key: jax.Array, num_rows: int, size: int) -> jax.Array:
  """A step's validation rows (size,): drawn from the split's `num_rows` without replacement."""
  return jax.random.choice(key, num_rows, (size,), replace=False)


def check_pool(ctx: StepContext, method: str) -> tuple[jax.Array, jax.Array]:
  """The step's training pool `(x, y)`, or a clear error naming `method` when the step was given none."""
  if ctx.pool is None:
    raise ValueError(
        f"{method} scores or probes the whole training pool; expected the pool given to the step"
        " (`Step.step(..., pool=(x, y))`; `train.fit` gives its training split)"
    )
  return ctx.pool


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
    init: `(key, num_train) -> state`; `num_train` is the pool size N the batches' indices address,
      or None for a stream with no pool (a method keeping a per-sample table then refuses).
    weights: `(state, ctx) -> (weights (B,), carry, metrics)`: non-negative per-sample weights summing to
      one for the model's step (importance weights that make the step unbiased sum to one in expectation), anything `update` needs from this step (any pytree, e.g. `()`), and
      scalar metrics to log. It does not change the state.
    update: `(state, ctx, result, carry) -> (state, metrics)`: the step's one state transition, after the
      model's step; returns the state in the structure `init` gives.
    probs: optional `state -> (N,)` sampling distribution over the training pool: the caller draws
      its next batch from it (`train.fit` does); when absent `fit` walks the pool in uniformly
      shuffled epochs, and a user loop feeds whatever batches it has.
    name: label used in logs.
    needs_pool: the method scores or probes the whole pool (`StepContext.pool`), so every step must
      be given it, and its `init` the pool size N.
    needs_validation: the method reads the step's clean validation batch (`StepContext.val_x`,
      `val_y`); a step given none refuses it before any compute.
  """

  init: Callable[[jax.Array, int], Any]
  weights: Callable[[Any, StepContext], tuple[jax.Array, Any, Metrics]]
  update: Callable[[Any, StepContext, StepResult, Any], tuple[Any, Metrics]]
  probs: Callable[[Any], jax.Array] | None = None
  name: str = "method"
  needs_pool: bool = False
  needs_validation: bool = True


def uniform_weights(size: int) -> jax.Array:
  """Every sample of a batch of `size` weighted 1 / size."""
  return jnp.full((size,), 1.0 / size, jnp.float32)


def keep_state(state, ctx, result, carry):
  """An `update` for methods whose state never changes."""
  return state, {}


def no_state(key: jax.Array, num_train: int | None) -> tuple:
  """An `init` for methods that keep no state."""
  return ()


def _uniform_batch(state, ctx: StepContext):
  return uniform_weights(ctx.batch.y.shape[0]), (), {}


def uniform() -> Method:
  """Every sample of a batch weighted 1/B, batches drawn as shuffled epochs: plain training.

  Made of module-level functions, so every `uniform()` is equal to every other.
  """
  return Method(no_state, _uniform_batch, keep_state, name="uniform", needs_validation=False)


def weight_diagnostics(weights: jax.Array) -> Metrics:
  """Effective batch size 1/sum p_i^2, max p_i and Var(p_i) of weights p (B,); importance weights, which sum to
  one only in expectation, are taken as they are."""
  return {
      "effective_batch_size": 1.0 / jnp.sum(jnp.square(weights)),
      "max_weight": jnp.max(weights),
      "weight_var": jnp.var(weights),
  }
