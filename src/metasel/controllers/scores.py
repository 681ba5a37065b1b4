"""Per-sample signals the training step already has, a pool table of them, and the schedules controllers share.

A controller reads one named signal of each batch from the loop's own forward pass at the step's
params (`core.StepContext`): no extra pass. `SIGNALS` lists them; `read_signal` returns the batch's
values (B,), and `ScoreTable` keeps every pool sample's value as last seen, with the training-dynamics
tracker (`metasel.signals`) when the signal needs one. `pacing`, `annealed_pressure` and `rank_probs`
are the schedules of curricula and of online batch selection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from metasel import adapters, checks, influence, persample, signals
from metasel.core import Batch, StepContext

__all__ = [
    "BATCH_SIGNALS", "DYNAMICS_SIGNALS", "SIGNALS", "POOL_SIGNALS", "check_signal", "output_grad_norm", "read_signal",
    "pool_signal",
    "ScoreTable", "table_init", "table_update", "pacing", "annealed_pressure", "rank_probs", "check_pacing",
    "check_pressure",
]

LossFn = persample.LossFn


def output_grad_norm(outputs: jax.Array, targets: jax.Array, loss_fn: LossFn = persample.softmax_cross_entropy) -> jax.Array:
  """||d loss_i / d outputs_i|| (B,): Katharopoulos & Fleuret's bound on the per-sample gradient norm, up to a constant.

  For softmax cross-entropy it equals EL2N, ||softmax(z_i) - onehot(y_i)||.
  """
  grads = influence.logit_grads(loss_fn, outputs, targets)  # (B, O): row i is d loss_i / d outputs_i
  return jnp.linalg.norm(grads.reshape(grads.shape[0], -1), axis=-1)


BatchSignal = Callable[[StepContext, LossFn], jax.Array]

# Signals of one forward pass: (ctx, loss_fn) -> (B,).
BATCH_SIGNALS: dict[str, BatchSignal] = {
    "loss": lambda ctx, loss_fn: ctx.losses,
    "el2n": lambda ctx, loss_fn: signals.el2n(ctx.outputs, ctx.batch.y),
    "entropy": lambda ctx, loss_fn: signals.predictive_entropy(ctx.outputs),
    "margin": lambda ctx, loss_fn: signals.margin(ctx.outputs, ctx.batch.y),
    "output_grad_norm": lambda ctx, loss_fn: output_grad_norm(ctx.outputs, ctx.batch.y, loss_fn),
    "p_uncertainty": lambda ctx, loss_fn: _p_one_minus_p(ctx),
    "random": lambda ctx, loss_fn: jax.random.uniform(jax.random.fold_in(ctx.key, 7), ctx.losses.shape),
}
# Signals a forward pass gives for any sample at given params (all but the random score).
POOL_SIGNALS = tuple(name for name in BATCH_SIGNALS if name != "random")
# Signals of the training dynamics so far, read from the tracker's summary after this step's record.
DYNAMICS_SIGNALS = ("forgetting", "confidence", "variability")
SIGNALS = tuple(BATCH_SIGNALS) + DYNAMICS_SIGNALS + ("table",)


def _p_one_minus_p(ctx: StepContext) -> jax.Array:
  p = signals.true_class_prob(ctx.outputs, ctx.batch.y)
  return p * (1.0 - p)


def check_signal(signal: str, table: Any = None) -> None:
  """A clear error for an unknown signal name, or a "table" signal without its table (or a table without it)."""
  if signal not in SIGNALS:
    raise ValueError(f"unknown signal {signal!r}; expected one of {SIGNALS}")
  if (signal == "table") != (table is not None):
    raise ValueError(
        "signal 'table' reads a per-sample table (N,) given as `table` (e.g. redundancy from"
        f" metasel.signals.redundancy); got signal={signal!r} with table {'given' if table is not None else 'None'}"
    )


def pool_signal(model: adapters.ModelLike, params, x: jax.Array, y: jax.Array, signal: str, loss_fn: LossFn) -> jax.Array:
  """`signal` (one of `POOL_SIGNALS`) of every sample of (x, y) at `params`, by one forward pass: (N,)."""
  if signal not in POOL_SIGNALS:
    raise ValueError(f"a pool signal comes from one forward pass; expected one of {POOL_SIGNALS}, got {signal!r}")
  outputs = persample.outputs(adapters.as_model(model), params, x)
  ctx = StepContext(params, Batch(jnp.arange(x.shape[0]), x, y), x[:0], y[:0], jax.random.key(0), loss_fn(outputs, y), outputs)
  return jnp.asarray(BATCH_SIGNALS[signal](ctx, loss_fn), jnp.float32)


class ScoreTable(NamedTuple):
  """Every pool sample's signal as last seen (N,) (+inf before it is first seen), the step, and the tracker (or ())."""

  values: jax.Array
  step: jax.Array
  tracker: Any = ()


def table_init(num_train: int, signal: str, table: Any = None) -> ScoreTable:
  """The table before training: the given table, or +inf (not yet seen) for every sample."""
  if signal == "table":
    values = jnp.asarray(table, jnp.float32)
    if values.shape != (num_train,):
      raise ValueError(f"table must have shape ({num_train},), one value per pool sample; got {values.shape}")
  else:
    values = jnp.full((num_train,), jnp.inf, jnp.float32)
  tracker = signals.tracker_init(num_train) if signal in DYNAMICS_SIGNALS else ()
  return ScoreTable(values, jnp.zeros((), jnp.int32), tracker)


def read_signal(table: ScoreTable, ctx: StepContext, signal: str, loss_fn: LossFn) -> tuple[jax.Array, Any]:
  """The batch's values (B,) of `signal` and the tracker after recording this batch (unchanged when not needed)."""
  rows = ctx.batch.indices
  if signal == "table":
    return table.values[rows], table.tracker
  if signal in BATCH_SIGNALS:
    return jnp.asarray(BATCH_SIGNALS[signal](ctx, loss_fn), jnp.float32), table.tracker
  tracker = signals.tracker_update(table.tracker, rows, ctx.losses, ctx.outputs, ctx.batch.y)
  values = signals.tracker_summary(tracker)[signal][rows]
  return jnp.asarray(values, jnp.float32), tracker


def table_update(table: ScoreTable, ctx: StepContext, signal: str, loss_fn: LossFn) -> ScoreTable:
  """The table with the batch's rows set to their values at this step, one step on."""
  values, tracker = read_signal(table, ctx, signal, loss_fn)
  return ScoreTable(table.values.at[ctx.batch.indices].set(values), table.step + 1, tracker)


# ----------------------------------------------------------------------------------------------------
# Schedules


def check_pacing(start: float, ramp_steps: int) -> None:
  """A pacing start outside (0, 1] or a ramp that is not a positive number of steps: a clear error."""
  if isinstance(start, bool) or not isinstance(start, numbers.Real) or not 0 < start <= 1:
    raise ValueError(f"pacing start g0 must lie in (0, 1] (the share of the sorted pool available at step 0), got {start!r}")
  checks.check_int("ramp_steps", ramp_steps)


def pacing(step: jax.Array, start: float, ramp_steps: int) -> jax.Array:
  """g(t) = min(1, g0 + (1 - g0) t / T_ramp): the share of the sorted pool available at step t."""
  return jnp.minimum(1.0, start + (1.0 - start) * jnp.asarray(step, jnp.float32) / ramp_steps)


def check_pressure(pressure: tuple[float, float], total_steps: int) -> None:
  """Selection pressures below 1 (the ratio of the most to the least likely sample's probability): a clear error."""
  valid = lambda s: isinstance(s, numbers.Real) and not isinstance(s, bool) and np.isfinite(s) and s >= 1
  if not isinstance(pressure, (tuple, list)) or len(pressure) != 2 or not all(valid(s) for s in pressure):
    raise ValueError(
        f"selection pressure must be (start, end), each >= 1 (1 is uniform sampling), got {pressure!r}"
    )
  checks.check_int("total_steps", total_steps)


def annealed_pressure(step: jax.Array, pressure: tuple[float, float], total_steps: int) -> jax.Array:
  """s(t) = s_0 (s_end / s_0)^(t / T): the selection pressure annealed log-linearly from s_0 at t = 0 to s_end at T."""
  start, end = pressure
  fraction = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
  return jnp.exp(np.log(start) + (np.log(end) - np.log(start)) * fraction)


def rank_probs(scores: jax.Array, pressure: jax.Array, tiebreak: jax.Array) -> jax.Array:
  """Loshchilov & Hutter's rank-based distribution (N,): p_i proportional to exp(-ln(s) rank_i / N).

  rank 0 is the highest score (ties broken by `tiebreak` (N,)); the top sample is s^((N - 1) / N), about s,
  times as likely as the bottom one.
  """
  n = scores.shape[0]
  order = jnp.lexsort((tiebreak, -scores))  # (N,) best first
  ranks = jnp.zeros((n,), jnp.float32).at[order].set(jnp.arange(n, dtype=jnp.float32))
  return jax.nn.softmax(-jnp.log(pressure) * ranks / n)
