"""Gradient weighting: importance sampling by the gradient-norm bound, and direct loss weighting.

* `importance_sampling` (Katharopoulos & Fleuret 2018): the loop's batch is a uniform presample of
  B = 3b; b of its samples are drawn with replacement with probability p_i = g_i / sum g by the bound g_i
  on their gradient norm. With k = 1 each draw is weighted 1 / (B p_i) / b (unbiased: the expected
  weighted gradient is the presample's mean); with k < 1 by (1 / (B p_i))^k, normalised to sum to one
  (biased towards hard samples, at the step scale of uniform weights). It is switched on once the
  estimated variance reduction tau (a moving average) passes its threshold; before that the first b
  presampled rows are used uniformly.
* `loss_weighting`: w_i proportional to clip((s_i / mean s)^alpha), a focal-like reweighting of the
  uniform batch by a signal (the loss by default).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, persample
from metasel.controllers import scores as scoring
from metasel.core import no_state, Method, StepContext, StepResult, keep_state
from metasel.records import valued
from metasel.numerics import safe_divide

__all__ = ["importance_weights", "ImportanceState", "variance_reduction", "importance_sampling", "loss_weighting"]

MAX_EXPONENT = 100.0


def importance_weights(probs: jax.Array, rows: jax.Array) -> jax.Array:
  """1 / (B N p_i) for the B rows drawn with replacement from `probs` (N,): the expected weighted gradient is the pool's mean."""
  n = probs.shape[0]
  return 1.0 / (rows.shape[0] * n * probs[rows])


def variance_reduction(probs: jax.Array) -> jax.Array:
  """Katharopoulos & Fleuret's estimate of the speed-up of sampling by `probs` (B,) over uniform:
  tau = (1 - ||p - u||^2 / ||p||^2)^(-1/2), 1 for uniform p."""
  uniform = 1.0 / probs.shape[0]
  ratio = jnp.sum(jnp.square(probs - uniform)) / jnp.sum(jnp.square(probs))
  return jax.lax.rsqrt(jnp.maximum(1.0 - ratio, 1e-12))


class ImportanceState(NamedTuple):
  """The moving average of tau and whether importance sampling is on."""

  tau: jax.Array
  active: jax.Array


def importance_sampling(
    batch_size: int,
    *,
    exponent: float = 1.0,
    threshold: float | None = None,
    smoothing: float = 0.9,
    signal: str = "output_grad_norm",
    loss_fn: persample.LossFn = persample.softmax_cross_entropy,
    name: str | None = None,
) -> Method:
  """Importance sampling of `batch_size` (b) rows from the loop's larger batch (the presample, B rows).

  Args:
    batch_size: b, the samples the step learns from; the loop's batch size is the presample B (3b in
      the paper).
    exponent: k in the weights (1 / (B p_i))^k; 1 is unbiased (the expected weighted gradient is the
      presample's mean gradient), k < 1 biases the step towards samples with large g_i.
    threshold: tau above which sampling switches on; default (B + 3b) / (3b), the paper's break-even
      when a forward pass costs a third of a training step. (In `train.fit` the backward pass runs over
      all B rows, zero-weighted ones included, so the step costs more than the paper's.)
    smoothing: moving-average factor of tau (which starts at 1, no reduction).
    signal: the bound g_i, a signal of `scores.POOL_SIGNALS` ("output_grad_norm": ||d loss / d outputs||,
      the bound, not the exact per-sample gradient norm `persample.grad_norms`).

  Bias: none with k = 1 (only the variance changes); towards hard samples with k < 1.
  """
  checks.check_int("batch_size", batch_size)
  checks.check_float("exponent", exponent, maximum=MAX_EXPONENT)
  checks.check_float("smoothing", smoothing, maximum=1.0)
  if threshold is not None:
    checks.check_positive("threshold", threshold)
  if signal not in scoring.POOL_SIGNALS:
    raise ValueError(f"importance sampling needs a bound of one forward pass; expected one of {scoring.POOL_SIGNALS}, got {signal!r}")
  label = name or f"importance-k{exponent:g}"
  return _importance_sampling(batch_size, float(exponent), threshold, float(smoothing), signal, loss_fn, label)


@valued
def _importance_sampling(batch_size, exponent, threshold, smoothing, signal, loss_fn, name) -> Method:
  def init(key, num_train):
    return ImportanceState(jnp.ones((), jnp.float32), jnp.zeros((), bool))

  def weights(state: ImportanceState, ctx: StepContext):
    presample = ctx.batch.y.shape[0]
    if presample < batch_size:
      raise ValueError(
          f"importance sampling draws b={batch_size} from the loop's batch, which has only {presample} rows;"
          " expected a presample B >= b (3b in the paper)"
      )
    limit = (presample + 3 * batch_size) / (3 * batch_size) if threshold is None else threshold
    bound = jnp.maximum(scoring.BATCH_SIGNALS[signal](ctx, loss_fn), 1e-12)  # (B,)
    p = bound / jnp.sum(bound)
    tau = smoothing * state.tau + (1 - smoothing) * variance_reduction(p)
    active = tau > limit
    drawn = jax.random.categorical(ctx.key, jnp.log(p), shape=(batch_size,))  # (b,) with replacement
    counts = jnp.zeros((presample,), jnp.float32).at[drawn].add(1.0)
    sampled = counts * jnp.power(1.0 / (presample * p), exponent)
    # k = 1: divided by b, unbiased (sums to one in expectation); k < 1: normalised, keeping the step's scale.
    sampled = sampled / batch_size if exponent == 1.0 else sampled / jnp.sum(sampled)
    plain = (jnp.arange(presample) < batch_size).astype(jnp.float32) / batch_size
    w = jnp.where(active, sampled, plain)
    return w, ImportanceState(tau, active), {"importance/tau": tau, "importance/active": active.astype(jnp.float32)}

  def update(state, ctx, result: StepResult, proposed: ImportanceState):
    return proposed, {}

  return Method(init, weights, update, name=name, needs_validation=False)


def loss_weighting(
    alpha: float,
    *,
    signal: str = "loss",
    max_ratio: float = 10.0,
    loss_fn: persample.LossFn = persample.softmax_cross_entropy,
    name: str | None = None,
) -> Method:
  """w_i proportional to clip((s_i / mean s)^alpha, 1 / max_ratio, max_ratio) over the batch, normalised to sum to one.

  alpha 0.5 is mild, 2 aggressive, 0 uniform. Bias: it changes the objective, towards samples with a
  high signal (hard samples for the loss).
  """
  checks.check_float("alpha", alpha, maximum=MAX_EXPONENT)
  checks.check_float("max_ratio", max_ratio, minimum=1.0, maximum=1e6)
  if signal not in scoring.POOL_SIGNALS:
    raise ValueError(f"loss weighting reads a signal of the step's forward pass; expected one of {scoring.POOL_SIGNALS}, got {signal!r}")
  return _loss_weighting(float(alpha), signal, float(max_ratio), loss_fn, name or f"loss-weighting-a{alpha:g}")


@valued
def _loss_weighting(alpha, signal, max_ratio, loss_fn, name) -> Method:
  def weights(state, ctx: StepContext):
    s = jnp.maximum(scoring.BATCH_SIGNALS[signal](ctx, loss_fn), 0.0)  # (B,)
    ratio = jnp.clip(jnp.power(safe_divide(s, jnp.mean(s), 1.0), alpha), 1.0 / max_ratio, max_ratio)
    return ratio / jnp.sum(ratio), (), {}

  return Method(no_state, weights, keep_state, name=name, needs_validation=False)
