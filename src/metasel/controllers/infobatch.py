"""InfoBatch (Qin et al. 2024): unbiased soft pruning of well-learned samples, the controllers' unbiased control.

At the start of every pass over the pool (N // B steps), each sample whose last-seen loss is below
the mean is dropped for that pass with probability r; the kept ones of that set are weighted
1 / (1 - r). Passes that would reach into the last share of training (12.5% by default) drop nothing.

The step budget stays that of uniform training (the paper shortens each epoch instead, saving compute):
batches are drawn with replacement from the K kept samples, q_i = 1 / K, and weighted
w_i = m_i / (B N q_i) with m_i the rescaling, so that every step's expected weighted gradient is the
whole pool's mean gradient. What it changes is only where the steps' samples come from, and the variance.
"""

from __future__ import annotations

from typing import NamedTuple


import jax
import jax.numpy as jnp

from metasel import checks, persample
from metasel.controllers import scores as scoring
from metasel.controllers.weighting import importance_weights
from metasel.core import Method, StepContext, StepResult
from metasel.records import valued

__all__ = ["InfoBatchState", "infobatch"]


class InfoBatchState(NamedTuple):
  """The pool's last-seen losses, this pass's kept mask (N,) and each sample's rescaling m_i (N,)."""

  table: scoring.ScoreTable
  kept: jax.Array
  rescale: jax.Array


def _prune(values: jax.Array, key: jax.Array, ratio: float, full_data: jax.Array):
  """The kept mask and rescaling of one pass: samples seen with a loss below the mean dropped with probability `ratio`."""
  seen = jnp.isfinite(values)
  mean = jnp.sum(jnp.where(seen, values, 0.0)) / jnp.maximum(jnp.sum(seen), 1)
  well_learned = seen & (values < mean) & ~full_data
  dropped = well_learned & (jax.random.uniform(key, values.shape) < ratio)
  rescale = jnp.where(well_learned, 1.0 / (1.0 - ratio), 1.0)
  return ~dropped, rescale


def infobatch(
    *,
    total_steps: int,
    pass_steps: int,
    ratio: float = 0.5,
    full_data_share: float = 0.125,
    loss_fn: persample.LossFn = persample.softmax_cross_entropy,
    name: str = "infobatch",
) -> Method:
  """InfoBatch over `total_steps`, repruning every `pass_steps` steps (one pass over the pool).

  Bias: none in expectation over the pruning (the rescaling keeps the expected gradient the pool's
  mean); the variance grows with the pruning ratio.
  """
  checks.check_int("total_steps", total_steps)
  checks.check_int("pass_steps", pass_steps)
  checks.check_float("ratio", ratio, maximum=0.99)
  checks.check_float("full_data_share", full_data_share, maximum=1.0)
  anneal_step = int(round((1.0 - full_data_share) * total_steps))
  return _infobatch(pass_steps, float(ratio), anneal_step, loss_fn, name)


@valued
def _infobatch(pass_steps: int, ratio: float, anneal_step: int, loss_fn, name: str) -> Method:
  def init(key, num_train):
    ones = jnp.ones((num_train,), jnp.float32)
    return InfoBatchState(scoring.table_init(num_train, "loss"), ones.astype(bool), ones)

  def probs(state: InfoBatchState) -> jax.Array:
    kept = state.kept.astype(jnp.float32)
    return kept / jnp.sum(kept)

  def weights(state: InfoBatchState, ctx: StepContext):
    rows = ctx.batch.indices
    w = state.rescale[rows] * importance_weights(probs(state), rows)
    return w, (), {"infobatch/kept": jnp.mean(state.kept.astype(jnp.float32))}

  def update(state: InfoBatchState, ctx: StepContext, result: StepResult, carry):
    table = scoring.table_update(state.table, ctx, "loss", loss_fn)
    prune_key = jax.random.fold_in(ctx.key, 11)
    kept, rescale = jax.lax.cond(
        table.step % pass_steps == 0,
        lambda: _prune(table.values, prune_key, ratio, table.step + pass_steps > anneal_step),
        lambda: (state.kept, state.rescale),
    )
    return InfoBatchState(table, kept, rescale), {}

  return Method(init, weights, update, probs=probs, name=name, needs_validation=False)
