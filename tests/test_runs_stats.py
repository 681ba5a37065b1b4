"""Run folders are written atomically and never overwritten; intervals match their textbook form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

from metasel import runs, stats


def test_write_json_is_atomic_and_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "summary.json"
  runs.write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan")})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": "nan"}
  with pytest.raises(TypeError):
    runs.write_json(path, {"bad": object()})
  assert json.loads(path.read_text())["a"] == 1.5  # the earlier file survives
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind
  log = runs.MetricsLog(tmp_path / "metrics.jsonl")
  log.write({"step": 1})
  assert path.stat().st_mode & 0o777 == (tmp_path / "metrics.jsonl").stat().st_mode & 0o777  # same mode


def test_new_run_dir_never_reuses_a_folder(tmp_path):
  first = runs.new_run_dir(tmp_path, "exp", "r1")
  (first / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="already exists"):
    runs.new_run_dir(tmp_path, "exp", "r1")
  assert (first / "keep.txt").read_text() == "x"


def test_metrics_log_appends_lines(tmp_path):
  log = runs.MetricsLog(tmp_path / "m.jsonl")
  log.write({"step": 1, "loss": np.float32(0.5)})
  log.write({"step": 2, "loss": 0.25})
  assert log.read() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_mean_ci_matches_student_t():
  values = [0.8, 0.82, 0.79, 0.85, 0.81]
  interval = stats.mean_ci(values)
  low, high = scipy.stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy.stats.sem(values))
  assert interval.mean == pytest.approx(np.mean(values))
  assert interval.half_width == pytest.approx((high - low) / 2)
  assert np.isnan(stats.mean_ci([0.5]).half_width)
  with pytest.raises(ValueError, match="at least one value"):
    stats.mean_ci([])


def test_auc_orientation_and_degenerate_labels():
  scores = np.array([0.1, 0.2, 0.8, 0.9])
  assert stats.auc(scores, [False, False, True, True]) == 1.0
  assert stats.auc(-scores, [False, False, True, True]) == 0.0
  assert np.isnan(stats.auc(scores, [True] * 4))


def test_verdicts_follow_the_interval_of_the_difference():
  assert stats.verdict({"mean": 0.02, "half_width": 0.01}) == "holds"
  assert stats.verdict({"mean": -0.02, "half_width": 0.01}) == "does not hold"
  assert stats.verdict({"mean": 0.02, "half_width": 0.03}) == "no significant difference"
  assert stats.verdict({"mean": 0.02, "half_width": float("nan")}) == "no significant difference"
  assert stats.verdict(stats.mean_ci([0.1, 0.12, 0.11])) == "holds"
  assert stats.verdict(stats.mean_ci([-0.1, 0.12, 0.01])) == "no significant difference"
