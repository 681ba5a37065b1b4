"""The influence benchmark's quick run prints every timing, ratio and memory figure the README reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark scripts' quick runs, like the other benchmarks', run with -m slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("plain_step", "ghost_influence_step", "lai_step", "greats_step")
SCORES = (
    "ghost_influence_score", "ghost_influence_score_on_tape", "lai_score", "lai_score_on_tape", "explicit_persample",
)
RATIOS = (
    "ghost_influence_over_plain", "lai_over_plain", "greats_over_plain", "explicit_over_ghost",
    "explicit_over_ghost_on_tape",
)
MEMORY = (*STEPS, "ghost_influence_score", "lai_score", "explicit_persample")


@pytest.fixture(scope="module")
def report():
  # The MLP row alone (the Transformer row's programs double the compile time); --quick compiles cheaply.
  out = subprocess.run(
      [sys.executable, "benchmarks/influence.py", "--quick", "--only", "mlp"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_time_ratio_and_memory(report):
  row = report["mlp"]
  for name in (*STEPS, *SCORES):
    assert _positive_finite(row[f"{name}_ms"]), name
  for name in RATIOS:
    assert _positive_finite(row[name]), name
  for name in MEMORY:  # None only on a backend without a compiled-memory analysis
    memory = row[f"{name}_memory_mb"]
    assert memory is None or _positive_finite(memory), name
  # Ghost influence is the exact <grad l_i, grad L_V>: it matches the explicit per-sample gradients.
  assert row["ghost_vs_explicit_max_rel_err"] < 1e-4
  for name in ("ghost_influence_step", "lai_step", "greats_step"):
    assert 0.0 <= row[f"{name}_mean_drop_rate"] < 1.0, name
  assert row["greats_step_mean_drop_rate"] == pytest.approx(0.5)  # GREATS keeps k = B / 2
  assert row["settings"]["batch"] == row["batch"] and row["settings"]["val_batch"] == 32


def test_quick_run_states_targets_settings_and_environment(report):
  targets = {"lai_over_plain", "ghost_influence_over_plain", "greats_over_plain", "explicit_over_ghost"}
  assert set(report["targets"]) == targets
  assert report["quick"] is True and "transformer" not in report
  for key in ("device", "backend", "jax_version", "optimizer", "greats", "lai", "rounds"):
    assert report[key], key
