"""The forecast-corpus experiment: seed-batched training equals one seed at a time, records hold the curve and
every per-sample summary, and bad settings are refused before any compute."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metasel_experiments
from metasel import signals
from metasel_experiments import make_model

MODULE = metasel_experiments.get("forecast-corpus")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_real": 96, "n_synthetic": 0, "n_val": 48, "n_test": 48, "dim": 8, "separation": 2.0}


def _tiny():
  config = dataclasses.replace(MODULE.get_config(quick=True), options={"mixture": TINY})
  dataset = MODULE.load_family("mixture", config, 0.25)
  return dataset, make_model("mlp", dataset, (8,))


def test_seed_batched_training_equals_one_seed_at_a_time():
  dataset, model = _tiny()
  together = MODULE.train_seeds(model, dataset, 3e-3, (0, 1), 3, 16)
  for index, seed in enumerate((0, 1)):
    (alone,) = MODULE.train_seeds(model, dataset, 3e-3, (seed,), 3, 16)
    for batched_record, record in zip(together[index], alone):
      assert batched_record.keys() == record.keys()
      np.testing.assert_allclose([batched_record[k] for k in record], list(record.values()), rtol=2e-4, atol=1e-5)
  assert together[0][0]["val/accuracy"] != together[1][0]["val/accuracy"]


def test_records_hold_the_curve_and_every_summary():
  dataset, model = _tiny()
  (records,) = MODULE.train_seeds(model, dataset, 3e-3, (0,), 2, 16)
  assert [r["epoch"] for r in records] == [1, 2]
  expected = {"epoch", "val/accuracy", "val/loss", "train/mean_loss"} | {f"signals/{n}" for n in signals.SUMMARY_NAMES}
  assert set(records[-1]) == expected
  assert all(np.isfinite(v) for v in records[-1].values())
  shares = [records[-1][f"signals/{n}_share"] for n in ("easy", "ambiguous", "hard")]
  assert sum(shares) == pytest.approx(1.0)
  assert dataset.train.tier.sum() > 0  # the label noise was applied


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cutoffs": (4, 12)}, "cutoff 12 \\+ horizon 4 is past the budget of 14"),
        ({"cutoffs": (4, 4)}, "cutoffs must be distinct"),
        ({"seeds": (0, 0)}, "seeds must be distinct"),
        ({"noises": (-0.1,)}, "noises"),
        ({"learning_rates": (0.0,)}, "learning_rates must be positive"),
        ({"hidden": ((0,),)}, "hidden must hold"),
        ({"folds": 9}, "the grid has 8 configurations, fewer than folds=9"),
        ({"permutations": 0}, "permutations"),
        ({"datasets": ("mixture", "csv:/no/such.csv")}, "does not exist"),
        ({"datasets": ("mixture",)}, "at least two distinct dataset specs"),
    ],
)
def test_bad_settings_are_refused(change, message):
  config = dataclasses.replace(MODULE.get_config(quick=True), **change)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    MODULE.check(config)


@pytest.mark.slow
def test_default_run_supports_the_readme(tmp_path):
  """The README's results section, from the full default run (about 12 minutes on 2 cores)."""
  summary = MODULE.run(MODULE.get_config(), tmp_path)
  assert summary["corpus"]["runs"] == 432
  for target, result in summary["targets"].items():
    metrics = result["metrics"]
    for cutoff in ("5", "10", "20", "30"):
      assert metrics[cutoff]["curve_boosting"]["skill"] > 0.3, (target, cutoff)
      assert metrics[cutoff]["curve_boosting"]["skill"] > metrics[cutoff]["power_law"]["skill"], (target, cutoff)
    assert metrics["all"]["curve_boosting"]["skill"] > max(metrics["all"][b]["skill"] for b in ("epoch_only", "accuracy_only")) + 0.3
    tests = result["permutation"]
    assert max(t["p"] for t in tests.values()) <= 0.01, target  # every test at its floor
    lodo = result["leave_one_dataset_out"]
    assert all(m["full_boosting"]["skill"] <= m["curve_boosting"]["skill"] for m in lodo.values()), target
  final = summary["targets"]["final_change"]["full_minus_curve"]["boosting"]
  assert final["5"]["mean"] + final["5"]["half_width"] < 0  # the per-sample summaries help early...
  assert final["30"]["mean"] + final["30"]["half_width"] > 0  # ...and not late
  coverage = summary["tool_intervals"]["leave_one_dataset_out"]
  assert 0.8 < coverage["final_change"]["all"]["90"] < 0.97 and coverage["plateau"]["all"]["90"] < 0.9


@pytest.mark.slow
def test_quick_benchmark_reports_batched_over_sequential_for_every_setting():
  out = subprocess.run([sys.executable, "benchmarks/forecast_corpus.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout)
  assert set(report["settings"]) == {"mixture/mlp-16", "digits-synthetic/mlp-16"}
  ratios = [s["batched_over_sequential"] for s in report["settings"].values()]
  assert all(math.isfinite(r) and r > 0 for r in ratios) and report["batched_over_sequential_max"] == max(ratios)
