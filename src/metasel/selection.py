"""Online batch selection as `core.Method`s: a rule keeps some of each batch, the step trains on those equally.

Every method here is one rule on top of one shared mechanism (`selection`), so any scorer works with any
rule that takes one:

* `sign_drop(scorer)`: keep samples of influence >= 0 (layer-aware influence's rule);
* `top_k(scorer, k)`: keep the k highest of a larger candidate batch;
* `greats(scorer, k, step_size)`: GREATS's greedy pick of k with train-train interactions;
* `self_paced(model, loss_fn)`: keep samples whose loss is at most the median validation loss (SPL);
* `random_drop(rate)`: drop each sample with probability `rate`, the control for training on fewer samples;
* `oracle(drop)`: drop exactly the pool samples marked in `drop` (e.g. the flipped labels).

The mechanism trains uniformly before `start_step`, when the scores are not finite (counted in the
state's `nan_skips`, each such step logged as `nan_skipped`, the state otherwise untouched) and when a
rule keeps nothing (`empty_steps`, logged as `empty_selection`); and
it counts, per pool sample, how often it was seen by a selecting step and how often dropped, so that
`drop_quality` can score the dropped samples against known corruption.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasel import checks, core, influence, persample, records
from metasel.adapters import ModelLike
from metasel.records import valued

__all__ = [
    "SelectionState", "Rule", "selection", "sign_drop", "top_k", "greats", "self_paced",
    "random_drop", "oracle", "drop_quality",
]

# `(rule_state, ctx) -> (keep (B,) bool, scores (B,))`: which samples to keep, and the scores behind it.
Rule = Callable[[Any, core.StepContext], tuple[jax.Array, jax.Array]]


class SelectionState(NamedTuple):
  """Counts of a selection method: per pool sample (N,) and per run, plus the rule's own state."""

  seen: jax.Array  # (N,) int32: times in the batch of a selecting step
  dropped: jax.Array  # (N,) int32: times dropped by one
  nan_skips: jax.Array  # () int32: steps trained uniformly because the scores were not finite
  empty_steps: jax.Array  # () int32: steps trained uniformly because the rule kept nothing
  step: jax.Array  # () int32
  rule: Any = ()


@valued
def selection(
    rule: Rule,
    *,
    name: str,
    start_step: int = 0,
    rule_state: Any = (),
    needs_validation: bool = True,
) -> core.Method:
  """A `core.Method` that trains each step on the batch samples `rule` keeps, weighted equally.

  Args:
    rule: `(rule_state, ctx) -> (keep (B,) bool, scores (B,))`; its scores are checked for NaN and
      reported (share below zero).
    name: label for logs.
    start_step: steps before this one train on the whole batch without scoring it (e.g. one epoch).
    rule_state: the rule's state (a mask, a rate), kept unchanged in `SelectionState.rule`.
    needs_validation: whether the rule reads the step's validation batch.

  The per-sample counts need the pool size; a stream with no pool (`num_train=None`) keeps none
  (empty tables), so every rule also selects from candidate batches a loader hands over.
  """
  checks.check_int("start_step", start_step, minimum=0)

  def init(key, num_train):
    zeros = jnp.zeros(0 if num_train is None else num_train, jnp.int32)
    return SelectionState(zeros, zeros, jnp.int32(0), jnp.int32(0), jnp.int32(0), rule_state)

  def weights(state, ctx):
    size = ctx.batch.y.shape[0]
    active = state.step >= start_step

    def scored():
      keep, scores = rule(state.rule, ctx)
      return keep.astype(bool), scores.astype(jnp.float32)

    keep, scores = jax.lax.cond(active, scored, lambda: (jnp.ones(size, bool), jnp.zeros(size, jnp.float32)))
    finite = jnp.all(jnp.isfinite(scores))
    selecting = active & finite & jnp.any(keep)
    kept = keep.astype(jnp.float32)
    w = jnp.where(selecting, kept / jnp.maximum(jnp.sum(kept), 1.0), core.uniform_weights(size))
    metrics = {
        "drop_rate": jnp.where(selecting, 1.0 - jnp.mean(kept), 0.0),
        "negative_share": jnp.where(active & finite, jnp.mean(scores < 0), 0.0),
        "selecting": selecting.astype(jnp.float32),
    }
    return w, (keep, selecting, active & ~finite, active & finite & ~jnp.any(keep)), metrics

  def update(state, ctx, result, carry):
    keep, selecting, not_finite, empty = carry
    rows = ctx.batch.indices
    counted = state.seen.shape[0] > 0  # no per-sample counts on a stream with no pool
    new = SelectionState(
        state.seen.at[rows].add(selecting.astype(jnp.int32)) if counted else state.seen,
        state.dropped.at[rows].add((selecting & ~keep).astype(jnp.int32)) if counted else state.dropped,
        state.nan_skips + not_finite.astype(jnp.int32),
        state.empty_steps + empty.astype(jnp.int32),
        state.step + 1,
        state.rule,
    )
    # Per-step indicators: their epoch means are the shares of steps skipped; the totals are in the state.
    return new, {"nan_skipped": not_finite.astype(jnp.float32), "empty_selection": empty.astype(jnp.float32)}

  return core.Method(init, weights, update, name=name, needs_validation=needs_validation)


def _scores(scorer: influence.Scorer, ctx: core.StepContext) -> jax.Array:
  """The scorer's influence of the batch on the validation batch, from the step's own tape."""
  return scorer.scores(ctx.params, ctx.batch.x, ctx.batch.y, ctx.val_x, ctx.val_y, tape=ctx.tape)


@valued
def sign_drop(scorer: influence.Scorer, *, start_step: int = 0) -> core.Method:
  """Keep the samples whose influence is >= 0, drop the rest (layer-aware influence's rule)."""

  def rule(_, ctx):
    scores = _scores(scorer, ctx)
    return scores >= 0, scores

  return selection(rule, name=f"{scorer.name}-sign", start_step=start_step)


def _check_k(k: int, size: int, method: str) -> None:
  """k (checked when the method was built) must fit the candidate batch, whose size is known when traced."""
  if k > size:
    raise ValueError(f"{method} keeps k={k} of each batch, but the candidate batch has only {size} samples;"
                     f" expected k <= {size} (a batch size of at least k)")


@valued
def top_k(scorer: influence.Scorer, k: int, *, start_step: int = 0) -> core.Method:
  """Keep the k samples of highest influence of each (larger) candidate batch."""
  checks.check_int("k", k, minimum=1)

  def rule(_, ctx):
    scores = _scores(scorer, ctx)
    _check_k(k, scores.shape[0], "top_k")
    chosen = jax.lax.top_k(scores, k)[1]
    return jnp.zeros(scores.shape[0], bool).at[chosen].set(True), scores

  return selection(rule, name=f"{scorer.name}-top{k}", start_step=start_step)


@valued
def greats(scorer: influence.Scorer, k: int, step_size: float, *, start_step: int = 0) -> core.Method:
  """GREATS: keep k of each candidate batch, picked greedily with the scorer's train-train interactions.

  `step_size` is eta in s_i = eta <g_i, g_V> and M_ij = eta^2 <g_i, g_j>: the step a sample's gradient
  takes. The loop steps on the mean of the k kept samples, so for SGD at learning rate lr that is lr / k;
  a larger eta weighs the interactions more. Interactions that are not finite skip the step, as NaN
  scores do.
  """
  checks.check_int("k", k, minimum=1)
  checks.check_positive("step_size", step_size)

  def rule(_, ctx):
    scores = _scores(scorer, ctx)
    _check_k(k, scores.shape[0], "greats")
    pairs = scorer.interactions(ctx.params, ctx.batch.x, ctx.batch.y, tape=ctx.tape)
    scores = jnp.where(jnp.all(jnp.isfinite(pairs)), scores, jnp.nan)  # a NaN interaction skips the step too
    return influence.greats(scores, pairs, k, step_size), scores

  return selection(rule, name=f"greats-{scorer.name}", start_step=start_step)


@valued
def self_paced(model: ModelLike, loss_fn: persample.LossFn, *, start_step: int = 0) -> core.Method:
  """Self-paced learning: keep samples whose loss is at most the median loss of the validation batch."""

  def rule(_, ctx):
    threshold = jnp.median(persample.losses(model, ctx.params, ctx.val_x, ctx.val_y, loss_fn))
    losses = persample.losses(model, ctx.params, ctx.batch.x, ctx.batch.y, loss_fn) if ctx.losses is None else ctx.losses
    scores = threshold - losses
    return scores >= 0, scores

  return selection(rule, name="spl", start_step=start_step)


def _random_rule(rate, ctx):
  draws = jax.random.uniform(ctx.key, ctx.batch.y.shape)
  return draws >= rate, jnp.zeros(ctx.batch.y.shape, jnp.float32)


def _oracle_rule(mask, ctx):
  keep = ~mask[ctx.batch.indices]
  return keep, keep.astype(jnp.float32) - 0.5


def random_drop(rate: float, *, start_step: int = 0) -> core.Method:
  """Drop each sample with probability `rate` at random: training on fewer samples, with no information.

  The rate is an array of the record, so runs at different rates share one compiled step.
  """
  checks.check_float("rate", rate, maximum=1.0)
  if rate >= 1.0:
    raise ValueError(f"random_drop needs a drop rate below 1 (some samples must be kept), got {rate}")
  checks.check_int("start_step", start_step, minimum=0)
  return records.recipe(_random_drop, rate=jnp.float32(rate), start_step=start_step)


def _random_drop(rate: jax.Array, start_step: int) -> core.Method:
  return selection(_random_rule, name="random-drop", start_step=start_step, rule_state=rate, needs_validation=False)


def oracle(drop: np.ndarray, *, start_step: int = 0) -> core.Method:
  """Drop exactly the pool samples marked True in `drop` (N,), e.g. the training samples whose labels were flipped.

  The mask is an array of the record, so oracles of different masks share one compiled step.
  """
  drop = np.asarray(drop)
  if drop.ndim != 1 or drop.dtype != bool:
    raise ValueError(f"oracle needs a boolean mask (num_train,) of the samples to drop, got {drop.dtype} of shape {drop.shape}")
  checks.check_int("start_step", start_step, minimum=0)
  return records.recipe(_oracle, drop=jnp.asarray(drop), start_step=start_step)


def _oracle(drop: jax.Array, start_step: int) -> core.Method:
  method = selection(_oracle_rule, name="oracle", start_step=start_step, rule_state=drop, needs_validation=False)

  def init(key, num_train):
    if num_train != drop.shape[0]:
      raise ValueError(f"oracle's mask has {drop.shape[0]} entries but the training pool has {num_train} samples")
    return method.init(key, num_train)

  return method._replace(init=init)


def drop_quality(state: SelectionState, corrupt: np.ndarray) -> dict[str, float]:
  """Precision and recall of the drops against a known corrupt mask (N,), and the overall drop rate.

  Counted over sample visits of selecting steps: precision = corrupt drops / drops; recall = corrupt drops /
  corrupt visits. NaN where a denominator is zero.
  """
  seen, dropped = np.asarray(state.seen, np.float64), np.asarray(state.dropped, np.float64)
  corrupt = np.asarray(corrupt, bool)
  if corrupt.shape != seen.shape:
    raise ValueError(f"corrupt mask has shape {corrupt.shape}; expected one entry per pool sample {seen.shape}")
  ratio = lambda a, b: float(a / b) if b > 0 else float("nan")  # noqa: E731
  return {
      "precision": ratio(dropped[corrupt].sum(), dropped.sum()),
      "recall": ratio(dropped[corrupt].sum(), seen[corrupt].sum()),
      "drop_rate": ratio(dropped.sum(), seen.sum()),
  }
