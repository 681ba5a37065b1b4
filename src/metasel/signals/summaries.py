"""Run-level summaries of per-sample signals: one scalar each (quantiles, shares, spreads) from a whole pool's
losses, logits and gradient norms and its training-dynamics tracker, to log beside a learning curve."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metasel.signals import _common, outputs
from metasel.signals.dynamics import TrackerState, tracker_summary

__all__ = ["QUANTILES", "AMBIGUOUS_VARIABILITY", "EASY_CONFIDENCE", "SUMMARY_NAMES", "pool_summary"]

QUANTILES = (0.1, 0.5, 0.9)
# Dataset-cartography regions (Swayamdipta et al., 2020): ambiguous samples vary most across evaluations;
# of the rest, easy ones are confidently right on average and hard ones are not.
AMBIGUOUS_VARIABILITY = 0.2
EASY_CONFIDENCE = 0.5

_QUANTILED = ("loss", "el2n", "entropy")
SUMMARY_NAMES = tuple(
    [f"{signal}_q{round(100 * q)}" for signal in _QUANTILED for q in QUANTILES]
    + ["forgotten_share", "easy_share", "ambiguous_share", "hard_share", "grad_norm_cv", "grad_norm_log_spread"]
)


def pool_summary(
    tracker: TrackerState, losses: jax.Array, logits: jax.Array, labels: jax.Array, grad_norms: jax.Array
) -> dict[str, jax.Array]:
  """Scalar summaries (`SUMMARY_NAMES`) of a pool of N samples evaluated at one point of training.

  Args:
    tracker: the pool's training-dynamics tracker, already updated with this evaluation (forgetting and
      cartography accumulate over evaluations).
    losses: (N,) per-sample losses now. logits: (N, C). labels: (N,) integer labels.
    grad_norms: (N,) per-sample gradient norms now (e.g. `persample.grad_norms`).

  Returns:
    loss, EL2N and predictive-entropy quantiles (`QUANTILES`); the share of samples ever forgotten; the
    easy / ambiguous / hard cartography shares (they sum to 1); the gradient norms' coefficient of
    variation and log(q90 / q10) spread.
  """
  _common.check_logits_labels(logits, labels)
  q = jnp.asarray(QUANTILES, jnp.float32)
  per_sample = {"loss": losses, "el2n": outputs.el2n(logits, labels), "entropy": outputs.predictive_entropy(logits)}
  result = {}
  for signal in _QUANTILED:
    for level, value in zip(QUANTILES, jnp.quantile(per_sample[signal].astype(jnp.float32), q)):
      result[f"{signal}_q{round(100 * level)}"] = value
  dynamics = tracker_summary(tracker)
  ambiguous = dynamics["variability"] >= AMBIGUOUS_VARIABILITY
  easy = ~ambiguous & (dynamics["confidence"] >= EASY_CONFIDENCE)
  result["forgotten_share"] = jnp.mean(dynamics["forgetting"] > 0)
  result["easy_share"] = jnp.mean(easy)
  result["ambiguous_share"] = jnp.mean(ambiguous)
  result["hard_share"] = jnp.mean(~ambiguous & ~easy)
  norms = grad_norms.astype(jnp.float32)
  result["grad_norm_cv"] = jnp.std(norms) / jnp.maximum(jnp.mean(norms), 1e-12)
  low, high = jnp.quantile(norms, jnp.asarray([0.1, 0.9], jnp.float32))
  result["grad_norm_log_spread"] = jnp.log(jnp.maximum(high, 1e-12) / jnp.maximum(low, 1e-12))
  return result
