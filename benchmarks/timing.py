"""Timing helper shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import time

import jax


def time_ms(fn, args, inner: int) -> float:
  """Mean milliseconds per call over `inner` back-to-back calls of a compiled function."""
  start = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner * 1e3
