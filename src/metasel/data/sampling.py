"""Index streams for training: uniform epochs and probability-weighted batches, in JAX.

Both functions are jit-compatible (sizes are static Python ints) and loop over nothing in Python.
Their arguments are checked before tracing; `probs` values only where they are concrete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metasel.checks import check_int


def epoch_batches(key: jax.Array, num_samples: int, batch_size: int, *, drop_last: bool = True) -> jax.Array:
  """One uniform epoch: a random permutation of range(num_samples) cut into batches, (num_batches, batch_size) int32.

  With `drop_last=False` the last batch is filled up with the first indices of the permutation, so every
  sample is seen and a few are seen twice. Under `jax.jit`, `num_samples` and `batch_size` must be static.

  Example: `epoch_batches(jax.random.key(0), 10, 4)` has shape (2, 4) and no repeated index.
  """
  check_int("num_samples", num_samples)
  check_int("batch_size", batch_size)
  if batch_size > num_samples:
    raise ValueError(f"batch_size={batch_size} is larger than num_samples={num_samples}; expected at most that")
  num_batches = num_samples // batch_size if drop_last else -(-num_samples // batch_size)
  perm = jax.random.permutation(key, num_samples).astype(jnp.int32)  # (N,)
  padded = jnp.concatenate([perm, perm[: num_batches * batch_size - num_samples]])  # wrap around when not dropping
  return padded[: num_batches * batch_size].reshape(num_batches, batch_size)


def pass_batches(key: jax.Array, num_samples: int, batch_size: int, first_step: int, num_steps: int) -> jax.Array:
  """Steps [first_step, first_step + num_steps) of a stream of uniform passes: (num_steps, batch_size) int32.

  Pass p is `epoch_batches(fold_in(key, p), ...)`; so with `num_steps` = num_samples // batch_size and
  `first_step` = e num_steps, this is the e-th uniform epoch, and evaluation periods of any length still
  walk the pool in shuffled passes.
  """
  check_int("num_steps", num_steps)
  check_int("first_step", first_step, minimum=0)
  if not 1 <= batch_size <= num_samples:
    raise ValueError(f"batch_size={batch_size} must lie in [1, num_samples={num_samples}]")
  per_pass = num_samples // batch_size
  first, last = first_step // per_pass, (first_step + num_steps - 1) // per_pass
  passes = [epoch_batches(jax.random.fold_in(key, p), num_samples, batch_size) for p in range(first, last + 1)]
  offset = first_step - first * per_pass
  return jnp.concatenate(passes)[offset : offset + num_steps]


def weighted_batches(
    key: jax.Array, probs: jax.Array, batch_size: int, num_batches: int, *, replace: bool = True
) -> jax.Array:
  """Batches of indices drawn with probability proportional to `probs` (N,): (num_batches, batch_size) int32.

  `probs` need not be normalised; zero entries are never drawn. With `replace=True` every draw is
  independent (categorical sampling); with `replace=False` a batch holds distinct indices, drawn by
  Gumbel top-k (sequential sampling without replacement), and batches are independent of each other.
  Under `jax.jit`, `batch_size` and `num_batches` must be static.
  """
  check_int("batch_size", batch_size)
  check_int("num_batches", num_batches)
  probs = jnp.asarray(probs)
  _check_probs(probs, batch_size, replace)
  if replace:
    # Inverse-CDF sampling: O(N + B log N) per batch, where categorical's Gumbel-max draws B x N numbers.
    cdf = jnp.cumsum(probs)  # (N,); a zero entry adds an empty interval, never drawn
    u = jax.random.uniform(key, (num_batches, batch_size), dtype=cdf.dtype) * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), probs.shape[0] - 1).astype(jnp.int32)
  logits = jnp.log(probs)  # (N,); log(0) = -inf is never drawn
  perturbed = logits + jax.random.gumbel(key, (num_batches, probs.shape[0]), dtype=logits.dtype)  # (S, N)
  return jax.lax.top_k(perturbed, batch_size)[1].astype(jnp.int32)


def _check_probs(probs: jax.Array, batch_size: int, replace: bool) -> None:
  """Raise on a bad shape, a batch of distinct indices larger than N, or (when concrete) bad probability values."""
  if probs.ndim != 1 or probs.shape[0] == 0:
    raise ValueError(f"probs must have shape (N,) with N >= 1, got shape {probs.shape}")
  if not jnp.issubdtype(probs.dtype, jnp.floating):
    raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")
  n = probs.shape[0]
  if not replace and batch_size > n:
    raise ValueError(
        f"batch_size={batch_size} is larger than the number of samples N={n}; expected at most N distinct indices"
        " per batch (replace=False)"
    )
  if isinstance(probs, jax.core.Tracer):
    return
  p = np.asarray(probs)
  if not np.isfinite(p).all():
    raise ValueError(f"probs has {int((~np.isfinite(p)).sum())} NaN or inf entries; expected finite values")
  if (p < 0).any():
    raise ValueError(f"probs has negative entries (min {p.min():.3g} at index {int(p.argmin())}); expected >= 0")
  if p.sum() <= 0:
    raise ValueError("probs are all zero; expected a positive sum")
  if not replace and (p > 0).sum() < batch_size:
    raise ValueError(
        f"only {int((p > 0).sum())} indices have positive probability but batch_size={batch_size} distinct"
        " indices were asked for (replace=False); expected at least batch_size positive entries"
    )
