"""Small numerical helpers shared by the signals, the weightings and the samplers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["safe_divide", "nonzero_scale"]


def safe_divide(numerator: jax.Array, denominator: jax.Array, fallback: jax.Array | float = 0.0) -> jax.Array:
  """`numerator / denominator` where the denominator is positive, else `fallback`; finite gradients either way.

  The inner `where` keeps a zero denominator out of the division, so that differentiating through the
  result never meets 0 / 0.
  """
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), fallback)


def nonzero_scale(spread: jax.Array) -> jax.Array:
  """A standardisation scale: the spread where it is positive, else 1 (a constant column stays put)."""
  return jnp.where(spread > 0, spread, 1.0)
