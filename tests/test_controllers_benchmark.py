"""The controllers benchmark's quick run prints every arm's epoch-time ratio to uniform, as positive finite numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from metasel_experiments.controllers_arms import ARMS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_reports_every_controller_over_uniform():
  out = subprocess.run(
      [sys.executable, "benchmarks/controllers.py", "--quick"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout)
  ratios = {k: v for k, v in report.items() if k.endswith("_over_uniform")}
  assert set(ratios) == {f"{arm}_over_uniform" for arm in ARMS if arm != "uniform"} | {"max_over_uniform"}
  assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in ratios.values())
  assert report["max_over_uniform"] == max(v for k, v in ratios.items() if k != "max_over_uniform")
