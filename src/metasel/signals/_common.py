"""Shape and value checks and the float promotion shared by the signal modules.

Value checks (labels in range) run only on concrete values, i.e. outside `jit`/`vmap`; shape checks
always run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x: jax.Array) -> jax.Array:
  """`x` in at least float32."""
  return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def concrete(x) -> np.ndarray | None:
  """`x` as a numpy array when its value is known (not a tracer), else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_rank(x, rank: int, name: str, shape: str) -> None:
  """Raise unless `x` has `rank` axes, naming the expected `shape`."""
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have shape {shape}, got shape {jnp.shape(x)}")


def check_same_batch(a, b, name_a: str, name_b: str) -> None:
  """Raise unless `a` and `b` have the same length on the batch axis 0."""
  if jnp.shape(a)[0] != jnp.shape(b)[0]:
    raise ValueError(
        f"{name_a} and {name_b} disagree on the batch axis 0: {jnp.shape(a)[0]} vs {jnp.shape(b)[0]}"
    )


def check_index_range(x, upper: int, name: str, what: str) -> None:
  """Raise unless `x` has an integer dtype and, when concrete, every value lies in [0, upper)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(x)}")
  values = concrete(x)
  if values is None or values.size == 0:
    return
  bad = values[(values < 0) | (values >= upper)]
  if bad.size:
    raise ValueError(f"{name} must be {what} in [0, {upper}), got {bad[0]} (and {bad.size - 1} more)")


def check_logits_labels(logits, labels) -> None:
  """Raise unless logits are (B, C) and labels (B,) class indices in [0, C)."""
  check_rank(logits, 2, "logits", "(batch, classes)")
  check_rank(labels, 1, "labels", "(batch,)")
  check_same_batch(logits, labels, "logits", "labels")
  check_index_range(labels, jnp.shape(logits)[1], "labels", "class indices")


def check_embeddings(emb, name: str = "embeddings") -> None:
  """Raise unless `emb` is a (batch, dim) matrix."""
  check_rank(emb, 2, name, "(batch, dim)")
