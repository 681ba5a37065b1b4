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


def test_one_sided_p_matches_scipy_and_handles_degenerate_input():
  d = np.array([0.3, -0.1, 0.5, 0.2, 0.4])
  t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
  assert stats.one_sided_p(d) == pytest.approx(scipy.stats.t.sf(t, d.size - 1))
  assert stats.one_sided_p(d, "less") == pytest.approx(scipy.stats.t.cdf(t, d.size - 1))
  assert np.isnan(stats.one_sided_p([1.0]))
  assert stats.one_sided_p([0.2, 0.2, np.nan]) == 0.0 and stats.one_sided_p([0.2, 0.2], "less") == 1.0
  with pytest.raises(ValueError, match="alternative"):
    stats.one_sided_p(d, "two-sided")


def test_holm_matches_hand_values_and_skips_nan():
  # Sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04): 0.03, 0.06, 0.06.
  np.testing.assert_allclose(stats.holm([0.04, 0.01, np.nan, 0.03]), [0.06, 0.03, np.nan, 0.06])
  np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])


def test_tost_matches_two_one_sided_t_tests_by_hand():
  d = np.array([0.1, -0.2, 0.05, 0.15, -0.05, 0.0])
  se = d.std(ddof=1) / np.sqrt(d.size)
  lower = scipy.stats.t.sf((d.mean() + 0.3) / se, d.size - 1)
  upper = scipy.stats.t.cdf((d.mean() - 0.3) / se, d.size - 1)
  result = stats.tost(d, 0.3)
  assert result["p"] == pytest.approx(max(lower, upper))
  assert result["equivalent"] and not stats.tost(d, 0.05)["equivalent"]


def test_comparison_verdicts_put_equivalence_first():
  assert stats.comparison_verdict(0.5, 0.5, 0.01) == "equivalent to uniform"
  assert stats.comparison_verdict(0.01, 0.9, 0.01) == "equivalent to uniform"  # a gain smaller than the margin
  assert stats.comparison_verdict(0.01, 0.9, 0.4) == "beats uniform"
  assert stats.comparison_verdict(0.9, 0.01, 0.4) == "worse"
  assert stats.comparison_verdict(0.2, 0.8, 0.3) == "inconclusive"
  assert stats.comparison_verdict(np.nan, np.nan, np.nan) == "inconclusive"


def test_tost_power_agrees_with_simulation_and_seeds_grow_with_the_spread():
  rng = np.random.default_rng(0)
  n, sd, margin = 8, 0.5, 0.5
  simulated = np.mean([stats.tost(rng.normal(0, sd, n), margin)["equivalent"] for _ in range(3000)])
  assert stats.tost_power(n, sd, margin) == pytest.approx(simulated, abs=0.04)
  assert stats.tost_seeds(0.0, 0.5) == 2
  assert stats.tost_seeds(0.25, 0.5) < stats.tost_seeds(0.5, 0.5) < stats.tost_seeds(1.0, 0.5)
  assert stats.tost_power(stats.tost_seeds(0.5, 0.5), 0.5, 0.5) >= 0.8 > stats.tost_power(stats.tost_seeds(0.5, 0.5) - 1, 0.5, 0.5)
  assert stats.tost_seeds(100.0, 0.01, most=50) is None


def test_a_spread_that_is_not_a_number_gives_no_seed_count():
  assert np.isnan(stats.tost_power(8, float("nan"), 0.5))
  assert stats.tost_seeds(float("nan"), 0.5) is None
