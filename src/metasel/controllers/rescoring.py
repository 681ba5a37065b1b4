"""Dynamic rescoring: online batch selection by the rank of a per-sample signal (Loshchilov & Hutter 2015).

Every pool sample keeps its signal as last seen (the loss by default, or predictive entropy, p(1 - p),
cartography variability, any name of `scores.SIGNALS`), optionally refreshed for the whole pool every
R steps. Batches are drawn with p_i proportional to exp(-ln(s_t) rank_i / N), the selection pressure
s_t annealed from s_0 to s_end; samples not yet seen rank first.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, persample
from metasel.controllers import scores as scoring
from metasel.controllers.weighting import importance_weights
from metasel.core import Method, StepContext, StepResult, check_pool, uniform_weights
from metasel.records import valued

__all__ = ["RescoringState", "rescoring", "entropy_rescoring", "random_scores"]


class RescoringState(NamedTuple):
  """The pool's score table and a fixed random tie-break (N,) for equal scores."""

  table: scoring.ScoreTable
  tiebreak: jax.Array


def _priority(values: jax.Array, prefer: str) -> jax.Array:
  """Scores with high = drawn first; unseen samples (+inf) first either way."""
  return jnp.where(jnp.isinf(values), jnp.inf, values if prefer == "high" else -values)


def rescoring(
    signal: str = "loss",
    *,
    total_steps: int,
    pressure: tuple[float, float] = (100.0, 1.0),
    prefer: Literal["high", "low"] = "high",
    refresh_every: int | None = None,
    model: Any = None,
    importance_weighted: bool = False,
    loss_fn: persample.LossFn = persample.softmax_cross_entropy,
    table: Any = None,
    name: str | None = None,
) -> Method:
  """Rank-based online batch selection by `signal`, its pressure annealed over `total_steps`.

  With `refresh_every` (needs `model`) the whole pool's signal is measured anew at step 0 and every R
  steps, by one forward pass over the pool; otherwise each sample keeps its value from the last batch
  it was in. Signal "table" ranks by a fixed per-sample `table` (N,). Bias: sampling by rank changes the
  objective towards the preferred samples, unless `importance_weighted`, which weights each drawn sample
  by 1 / (B N p_i) so that the expected weighted gradient is the full pool's mean gradient (the weights
  then sum to one only in expectation).
  """
  scoring.check_signal(signal, table)
  scoring.check_pressure(pressure, total_steps)
  checks.check_choice("prefer", prefer, ("high", "low"))
  checks.check_int("refresh_every", refresh_every, allow_none=True)
  if refresh_every is not None and (model is None or signal not in scoring.POOL_SIGNALS):
    raise ValueError(
        f"refresh_every measures the whole pool's {signal!r} with the model; expected a `model` and a signal of"
        f" one forward pass, one of {scoring.POOL_SIGNALS}"
    )
  label = name or f"rescoring-{signal}" + ("-unbiased" if importance_weighted else "")
  table = None if table is None else jnp.asarray(table, jnp.float32)
  return _rescoring(
      signal, total_steps, tuple(float(s) for s in pressure), prefer, refresh_every, model, bool(importance_weighted),
      loss_fn, table, label,
  )


@valued
def _rescoring(signal, total_steps, pressure, prefer, refresh_every, model, importance_weighted, loss_fn, table, name) -> Method:
  """`rescoring`'s method; its initial `table` (N,) is an array of the record, so runs differing only in it
  share one compiled step."""

  def init(key, num_train):
    return RescoringState(scoring.table_init(num_train, signal, table), jax.random.uniform(key, (num_train,)))

  def probs(state: RescoringState) -> jax.Array:
    s = scoring.annealed_pressure(state.table.step, pressure, total_steps)
    return scoring.rank_probs(_priority(state.table.values, prefer), s, state.tiebreak)

  def weights(state: RescoringState, ctx: StepContext):
    table = state.table
    if refresh_every is not None:
      due = table.step % refresh_every == 0
      pool_x, pool_y = check_pool(ctx, name)
      fresh = lambda: scoring.pool_signal(model, ctx.params, pool_x, pool_y, signal, loss_fn)
      table = table._replace(values=jax.lax.cond(due, fresh, lambda: table.values))
    w = importance_weights(probs(state), ctx.batch.indices) if importance_weighted else uniform_weights(ctx.batch.y.shape[0])
    pressure_now = scoring.annealed_pressure(state.table.step, pressure, total_steps)
    return w, state._replace(table=table), {"rescoring/pressure": pressure_now}

  def update(state: RescoringState, ctx: StepContext, result: StepResult, proposed: RescoringState):
    return proposed._replace(table=scoring.table_update(proposed.table, ctx, signal, loss_fn)), {}

  return Method(init, weights, update, probs=probs, name=name, needs_pool=refresh_every is not None, needs_validation=False)


def entropy_rescoring(signal: Literal["entropy", "p_uncertainty", "variability"] = "entropy", **kwargs) -> Method:
  """Rescoring by uncertainty: predictive entropy, p(1 - p) of the true class, or cartography variability
  (Active Bias, Chang et al. 2017). Biased as `rescoring` is."""
  checks.check_choice("signal", signal, ("entropy", "p_uncertainty", "variability"))
  return rescoring(signal, name=kwargs.pop("name", f"rescoring-{signal}"), **kwargs)


def random_scores(**kwargs) -> Method:
  """The negative control: rescoring by a fresh uniform random score per sample seen.

  Bias: none in expectation over the scores; the batches are drawn with replacement from a
  non-uniform but random distribution, so it should train like uniform sampling.
  """
  return rescoring("random", name=kwargs.pop("name", "random-scores"), **kwargs)
