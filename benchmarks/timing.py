"""Timing and memory helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import time

import jax

from metasel import runs

# The MLP and Transformer the influence and memory benchmarks measure, and their --quick smoke-test sizes
# (same code paths, tiny shapes).
MODEL_SIZES = {
    "full": {
        "mlp": {"input_dim": 2000, "hidden": (128, 128), "batch": 128},
        "transformer": {"vocab": 20000, "width": 64, "depth": 2, "heads": 4, "length": 64, "batch": 128},
    },
    "quick": {
        "mlp": {"input_dim": 64, "hidden": (16, 16), "batch": 16},
        "transformer": {"vocab": 100, "width": 16, "depth": 1, "heads": 2, "length": 16, "batch": 16},
    },
}


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
