"""Timing and memory helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

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


def epoch_seconds(fits: dict[str, Callable[[Callable[[dict], None]], Any]], rounds: int) -> dict[str, float]:
  """Median seconds per epoch of each `fit(log)` (a `train.fit` call logging through `log`), over `rounds`
  interleaved rounds: the time between consecutive per-epoch records, the first epoch (compilation) left out."""
  samples = {name: [] for name in fits}
  for _ in range(rounds):
    for name, fit in fits.items():
      stamps = []
      fit(lambda record, stamps=stamps: "epoch" in record and stamps.append(time.perf_counter()))
      samples[name].extend(later - earlier for earlier, later in zip(stamps, stamps[1:]))
  return {name: statistics.median(times) for name, times in samples.items()}


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
