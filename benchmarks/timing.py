"""Timing and memory helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import time

import jax

from metasel import runs


def time_ms(fn, args, inner: int) -> float:
  """Mean milliseconds per call over `inner` back-to-back calls of a compiled function."""
  start = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner * 1e3


def compiled_memory(fn, args) -> float | None:
  """Megabytes a jitted `fn(*args)` needs beyond its arguments (`metasel.runs.compiled_memory_mb`)."""
  return runs.compiled_memory_mb(fn.lower(*args).compile())
