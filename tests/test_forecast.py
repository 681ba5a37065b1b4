"""metasel.forecast: targets on hand-made curves, features, the pow3 fit, grouped validation without leaks, the
permutation tests' calibration, the conditional permutation's bins, the shipped forecaster, and bad input."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

from metasel import signals
from metasel.forecast import features, models, reading, table, targets, tool, validation


# --- targets -------------------------------------------------------------------------------------------------


def test_level_final_and_gain_by_hand():
  accuracy = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
  assert targets.level(accuracy, 1) == pytest.approx(0.1)
  assert targets.level(accuracy, 2) == pytest.approx(0.15)
  assert targets.level(accuracy, 4) == pytest.approx(0.3)
  assert targets.final_accuracy(accuracy) == pytest.approx(0.5)
  assert targets.gain(accuracy, 3, 3) == pytest.approx(0.5 - 0.2)


def test_plateau_of_a_curve_that_rises_then_stays_flat():
  accuracy = [0.2, 0.5, 0.8] + [0.8] * 17  # levels 0.2, 0.35, 0.5, 0.7, 0.8, 0.8, ...
  assert targets.plateau_epoch(accuracy) == (5, True)


def test_plateau_of_a_curve_that_peaks_then_overfits():
  accuracy = [0.5, 0.7, 0.9, 0.9, 0.9] + list(np.linspace(0.88, 0.7, 15))
  assert targets.plateau_epoch(accuracy) == (5, True)


def test_plateau_is_censored_at_the_budget_while_the_curve_still_rises():
  assert targets.plateau_epoch(0.01 * np.arange(1, 21)) == (20, False)
  late = list(0.04 * np.arange(1, 18)) + [0.68] * 3  # rises to epoch 17 of 20: too little evidence after it
  assert targets.plateau_epoch(late) == (20, False)
  assert targets.plateau_epoch(late, patience=0)[1]


def test_targets_at_a_cutoff_by_hand():
  accuracy = [0.2, 0.5, 0.8] + [0.8] * 17
  result = targets.targets(accuracy, 3, 2)
  assert result["final"] == pytest.approx(0.8)
  assert result["final_change"] == pytest.approx(0.8 - 0.5)
  assert result["gain"] == pytest.approx(0.8 - 0.5)
  assert result["helps"] == 1.0
  assert (result["plateau"], result["plateau_observed"]) == (5.0, 1.0)
  with pytest.raises(ValueError, match="cutoff 19 with horizon 2"):
    targets.targets(accuracy, 19, 2)


# --- features ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [(0.9, 0.5, 0.7), (0.75, 0.3, 1.5), (0.6, -0.2, 0.4)])
def test_pow3_fit_recovers_known_parameters(params):
  epochs = np.arange(1, 31)
  fitted = features.fit_pow3(epochs, features.pow3(epochs, *params))
  np.testing.assert_allclose(fitted, params, atol=2e-3)


def test_pow3_fit_of_a_too_short_curve_is_flat_at_its_level():
  assert features.fit_pow3([1, 2], [0.4, 0.6]) == (pytest.approx(0.5), 0.0, 1.0)


def test_prechelt_criteria_by_hand():
  gl, pq = features.prechelt([1.0, 0.8, 0.9], [1.0, 1.0, 1.0, 1.0, 2.0])
  assert gl == pytest.approx(12.5)  # 100 (0.9 / 0.8 - 1)
  assert pq == pytest.approx(12.5 / 200.0)  # P_5 = 1000 (1.2 / 1.0 - 1)


def _curve(epochs: int, accuracy=None, **extra) -> dict[str, np.ndarray]:
  t = np.arange(1, epochs + 1, dtype=np.float64)
  return {
      "val/accuracy": 0.9 - 0.5 / t if accuracy is None else np.asarray(accuracy, np.float64),
      "val/loss": 1.0 / t + 0.01 * t,
      "train/mean_loss": 1.0 / t,
      **extra,
  }


def test_curve_features_of_a_line_and_a_parabola():
  t = np.arange(1, 11, dtype=np.float64)
  line = features.curve_features(_curve(10, 0.3 + 0.02 * t), 10, 20, 5)
  assert line["accuracy_slope_3"] == pytest.approx(0.02)
  assert line["accuracy_slope_5"] == pytest.approx(0.02)
  assert line["accuracy_curvature"] == pytest.approx(0.0, abs=1e-9)
  assert line["accuracy"] == pytest.approx(0.3 + 0.02 * 9)
  assert line["below_best"] == pytest.approx(0.02)
  assert line["generalisation_gap"] == pytest.approx(np.mean(0.01 * t[-3:]))
  parabola = features.curve_features(_curve(10, 0.1 + 0.01 * t - 0.0005 * t**2), 10, 20, 5)
  assert parabola["accuracy_curvature"] == pytest.approx(-0.001)
  assert set(line) == set(features.CURVE_FEATURES)


def test_features_use_only_epochs_up_to_the_cutoff():
  rng = np.random.default_rng(5)
  curve = _curve(20, **{column: rng.uniform(size=20) for column in features.SAMPLE_COLUMNS})
  cut = {k: v[:8] for k, v in curve.items()}
  assert features.curve_features(curve, 8, 20, 5) == features.curve_features(cut, 8, 20, 5)
  assert features.sample_features(curve, 8) == features.sample_features(cut, 8)
  change = features.sample_features(curve, 8)["signals/loss_q50/change"]
  assert change == pytest.approx(curve["signals/loss_q50"][7] - curve["signals/loss_q50"][4])


# --- per-sample summaries ------------------------------------------------------------------------------------


def test_pool_summary_quantiles_and_shares():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 3, 50).astype(np.int32)
  losses, norms = rng.exponential(size=50).astype(np.float32), rng.exponential(size=50).astype(np.float32) + 0.1
  tracker = signals.tracker_init(50)
  for step in range(3):
    tracker = signals.tracker_update(tracker, np.arange(50), losses, logits * (1 - step), labels)
  summary = {k: float(v) for k, v in signals.pool_summary(tracker, losses, logits, labels, norms).items()}
  assert set(summary) == set(signals.SUMMARY_NAMES)
  assert summary["loss_q50"] == pytest.approx(np.quantile(losses, 0.5), rel=1e-5)
  assert summary["el2n_q90"] == pytest.approx(np.quantile(np.asarray(signals.el2n(logits, labels)), 0.9), rel=1e-5)
  assert summary["easy_share"] + summary["ambiguous_share"] + summary["hard_share"] == pytest.approx(1.0)
  assert summary["forgotten_share"] == pytest.approx(float(np.mean(np.asarray(signals.tracker_summary(tracker)["forgetting"]) > 0)))
  assert summary["grad_norm_cv"] == pytest.approx(np.std(norms) / np.mean(norms), rel=1e-4)


# --- grouped validation --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=12, max_size=60), st.integers(2, 4))
def test_grouped_splits_never_leak_a_group(labels, folds):
  groups = np.asarray(labels)
  if np.unique(groups).size < folds:
    with pytest.raises(ValueError, match="needs at least"):
      validation.grouped_splits(groups, folds)
    return
  splits = validation.grouped_splits(groups, folds) + validation.leave_one_group_out(groups)
  for train, test in splits:
    assert not set(groups[train]) & set(groups[test])
  tested = np.concatenate([test for _, test in splits[:folds]])
  assert np.array_equal(np.sort(tested), np.arange(groups.size))


def _runs(configs: int = 4, seeds: int = 2, epochs: int = 14) -> list[reading.Run]:
  result = []
  for c in range(configs):
    for s in range(seeds):
      t = np.arange(1, epochs + 1, dtype=np.float64)
      accuracy = 0.5 + 0.1 * c - (0.3 + 0.02 * s) / t
      result.append(reading.Run({"dataset": f"d{c % 2}", "lr": 0.1 * c, "seed": s}, _curve(epochs, accuracy)))
  return result


def test_table_puts_a_configurations_seeds_and_cutoffs_in_one_group():
  built = table.build_table(_runs(), (4, 6), 5)
  assert built.curve.shape == (16, len(features.CURVE_FEATURES))
  assert np.isnan(built.sample).all()
  assert np.unique(built.groups).size == 4
  for run in np.unique(built.runs):
    assert np.unique(built.groups[built.runs == run]).size == 1
  assert set(built.datasets) == {"d0", "d1"}
  with pytest.raises(ValueError, match="needs at least 5 groups, but the corpus has 4"):
    validation.grouped_splits(built.groups, 5)


def test_a_corpus_of_one_configuration_is_refused():
  one = table.build_table(_runs(configs=1, seeds=3), (4,), 5)
  with pytest.raises(ValueError, match="has 1 .*several configurations"):
    validation.grouped_splits(one.groups, 2)
  with pytest.raises(ValueError, match="needs at least 2 groups"):
    validation.leave_one_group_out(one.groups)


# --- permutation tests ---------------------------------------------------------------------------------------


def _grouped_data(rng, n_groups=12, per_group=5, planted=False):
  groups = np.repeat(np.arange(n_groups), per_group)
  x = rng.normal(size=(groups.size, 3))
  y = (x[:, 0] if planted else 0.0) + rng.normal(size=groups.size) * (0.3 if planted else 1.0)
  return x, y, groups


def test_pipeline_permutation_p_is_uniform_on_shuffled_targets_and_small_on_a_planted_signal():
  rng = np.random.default_rng(0)
  pvalues = []
  for _ in range(30):
    x, y, groups = _grouped_data(rng)
    pvalues.append(validation.permutation_test(LinearRegression(), x, y, validation.grouped_splits(groups, 3), permutations=49,
                                               seed=int(rng.integers(1 << 30)))["p"])
  assert scipy.stats.kstest(pvalues, "uniform").pvalue > 0.01
  assert 0.3 < np.mean(pvalues) < 0.7
  x, y, groups = _grouped_data(rng, planted=True)
  result = validation.permutation_test(LinearRegression(), x, y, validation.grouped_splits(groups, 3), permutations=49)
  assert result["p"] == pytest.approx(1 / 50)
  assert result["mae"] < result["null_mae_median"]


def test_confound_bins_split_by_cutoff_and_order_by_accuracy():
  cutoffs = np.repeat([5, 10], 10)
  accuracy = np.tile(np.linspace(0.5, 0.9, 10), 2)[::-1]
  bins = validation.confound_bins(cutoffs, accuracy, per_cutoff=5)
  assert not set(bins[cutoffs == 5]) & set(bins[cutoffs == 10])
  assert np.unique(bins).size == 10
  for c in (5, 10):
    rows = cutoffs == c
    order = np.argsort(accuracy[rows])
    assert np.all(np.diff(bins[rows][order]) >= 0)


def test_permute_within_keeps_every_row_in_its_bin():
  rng = np.random.default_rng(1)
  bins = rng.integers(0, 6, 200)
  for _ in range(5):
    order = validation.permute_within(bins, rng)
    assert np.array_equal(np.sort(order), np.arange(200))
    assert np.array_equal(bins[order], bins)
  assert not np.array_equal(validation.permute_within(bins, rng), np.arange(200))


def _confounded(rng, n_groups=24):
  groups, cutoffs = np.repeat(np.arange(n_groups), 5), np.tile([3, 6, 9, 12, 15], n_groups)
  accuracy, loss, extra = rng.uniform(size=groups.size), rng.normal(size=groups.size), rng.normal(size=groups.size)
  return groups, cutoffs, accuracy, loss, extra


def test_conditional_permutation_separates_added_skill_from_what_the_fixed_features_say():
  rng = np.random.default_rng(2)
  groups, cutoffs, accuracy, loss, extra = _confounded(rng)
  bins = validation.confound_bins(cutoffs, accuracy, per_cutoff=4)
  splits = validation.grouped_splits(groups, 4)
  fixed = np.column_stack([accuracy, loss])
  noise = 0.1 * rng.normal(size=groups.size)
  informative = validation.conditional_permutation_test(LinearRegression(), fixed, extra[:, None], accuracy + loss + extra + noise, splits, bins, 49)
  assert informative["p"] == pytest.approx(1 / 50)
  # A block restating a fixed feature that is not binned (the loss) adds nothing beyond the fixed features:
  # permuting only its residual keeps its link to them, so the test does not call it informative.
  proxy = (loss + 0.01 * rng.normal(size=groups.size))[:, None]
  pvalues = [validation.conditional_permutation_test(LinearRegression(), fixed, proxy, accuracy + loss + noise, splits, bins, 19, seed)["p"]
             for seed in range(10)]
  assert min(pvalues) > 0.05


def test_group_permutation_exchanges_whole_groups_and_is_calibrated():
  rng = np.random.default_rng(4)
  groups = np.repeat(["a", "b", "c", "d"], 3)
  order = validation.block_permutation(groups, rng)
  for name in "abcd":
    assert np.unique(groups[order[groups == name]]).size == 1
  with pytest.raises(ValueError, match="groups of one size"):
    validation.block_permutation(np.array([0, 0, 1]), rng)
  pvalues = []
  for _ in range(30):
    x, y, g = _grouped_data(rng)
    y = y + np.repeat(rng.normal(size=12), 5)  # targets correlated within groups
    pvalues.append(validation.group_permutation_test(LinearRegression(), x, y, validation.grouped_splits(g, 3), g, 19,
                                                     int(rng.integers(1 << 30)))["p"])
  assert scipy.stats.kstest(pvalues, "uniform").pvalue > 0.01
  x, y, g = _grouped_data(rng, planted=True)
  assert validation.group_permutation_test(LinearRegression(), x, y, validation.grouped_splits(g, 3), g, 19)["p"] == pytest.approx(1 / 20)


def test_optimism_reports_both_schemes():
  x, y, groups = _grouped_data(np.random.default_rng(3), planted=True)
  result = validation.optimism(LinearRegression(), x, y, groups, 3)
  assert result["kfold_minus_logo"] == pytest.approx(result["kfold_mae"] - result["logo_mae"])
  assert 0 < result["logo_mae"] < 1


def test_metrics_by_hand():
  assert validation.skill(1.0, 4.0) == 0.75
  assert validation.coverage([1, 2, 3, 4], [0, 2.5, 2, 5], [1, 3, 4, 6]) == 0.5
  assert validation.rank_within([1, 2, 3, 3, 2, 1], [1, 2, 3, 1, 2, 3], [0, 0, 0, 1, 1, 1]) == pytest.approx(0.0)
  assert validation.brier([1, 0], [1.0, 0.5]) == pytest.approx(0.125)


# --- the forecaster and the tool -----------------------------------------------------------------------------


def test_forecaster_refits_from_its_saved_table_with_its_residual_intervals(tmp_path):
  built = table.build_table(_runs(configs=6, seeds=3, epochs=16), (4, 6, 8), 5)
  residuals = {"curve": models.interval_residuals(built, "curve", folds=3)}
  path = tmp_path / "forecaster.json"
  tool.save_forecaster(path, built, residuals, {"runs": 18})
  loaded = tool.load_forecasters(path, ("curve",))["curve"]
  fitted = models.boosting().fit(built.curve, built.targets["gain"])
  row = dict(zip(features.CURVE_FEATURES, built.curve[5]))
  forecast = loaded.predict(row)
  assert forecast["gain"] == pytest.approx(float(fitted.predict(built.curve[5:6])[0]), abs=1e-9)
  assert forecast["final"] == pytest.approx(np.clip(row["accuracy"] + forecast["final_change"], 0, 1))
  assert all(0 <= v <= 1 for band in forecast["final_intervals"].values() for v in band)
  low, high = forecast["gain_intervals"][0.8]
  band = residuals["curve"]["gain"][str(int(row["epoch"]))]["0.8"]
  assert (low, high) == pytest.approx((forecast["gain"] + band[0], forecast["gain"] + band[1]))
  assert loaded.corpus == {"runs": 18}
  table.save_table(tmp_path / "forecast_table.npz", built)
  again = table.load_table(tmp_path / "forecast_table.npz")
  assert np.array_equal(again.curve, built.curve) and np.array_equal(again.groups, built.groups)


@functools.cache
def _forecasters() -> dict[str, models.Forecaster]:
  return {"curve": models.fit_forecaster(table.build_table(_runs(configs=6, epochs=16), (5, 8), 5), "curve", folds=3)}


def _write_csv(path, rows, header="epoch,val_accuracy,val_loss,train_loss"):
  path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
  return path


def _csv_rows(epochs: int):
  return [(e, round(0.9 - 0.5 / e, 4), round(1 / e + 0.01 * e, 4), round(1 / e, 4)) for e in range(1, epochs + 1)]


def test_forecast_command_on_a_plain_csv_with_the_shipped_forecaster(tmp_path, capsys):
  from metasel import cli

  path = _write_csv(tmp_path / "metrics.csv", _csv_rows(12))
  assert cli.main(["forecast", str(path)]) == 0
  printed = capsys.readouterr().out
  assert "shipped with metasel" in printed and "curve features" in printed and "at epoch 12" in printed
  assert "final accuracy at epoch" in printed and "plateau at epoch" in printed
  assert (tmp_path / "metrics-forecast.png").stat().st_size > 0


def test_csv_of_several_runs_is_told_apart_by_columns(tmp_path):
  rows = [(s, *r) for s in (0, 1) for r in _csv_rows(8)]
  path = _write_csv(tmp_path / "runs.csv", rows, "seed,epoch,val_accuracy,val_loss,train_loss")
  with pytest.raises(ValueError, match="epochs are .*pass --by"):
    reading.read_runs(path)
  found = reading.read_runs(path, ("seed",))
  assert [r.tags for r in found] == [{"seed": "0"}, {"seed": "1"}]
  assert found[1].metrics["val/accuracy"].size == 8


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (_csv_rows(3), None, "has 3 epochs, shorter than the cutoff 5"),
        ([r[:3] for r in _csv_rows(8)], "epoch,val_accuracy,val_loss", r"lacks the metric column\(s\) train/mean_loss \(or train/loss"),
        ([r if r[0] != 4 else (4, "nan", 0.5, 0.5) for r in _csv_rows(8)], None, "val/accuracy is nan at epoch 4"),
        ([r if r[0] != 2 else (2, "high", 0.5, 0.5) for r in _csv_rows(8)], None, "row 3, column 'val_accuracy'"),
        ([r if r[0] != 2 else (2, 0.5, 0.5, 0.5, 9) for r in _csv_rows(8)], None, "row 3 has 5 fields where the header has 4"),
        ([r if r[0] != 2 else (2, 0.5, 0.5) for r in _csv_rows(8)], None, "row 3 has 3 fields where the header has 4"),
        ([(e, 100 * a, v, t) for e, a, v, t in _csv_rows(8)], None, "val/accuracy is 40.0 at epoch 1; expected a fraction"),
    ],
)
def test_bad_metrics_get_a_clear_error_naming_what_is_wrong(tmp_path, rows, header, message):
  path = _write_csv(tmp_path / "bad.csv", rows, *([header] if header else []))
  forecasters = _forecasters()
  with pytest.raises(ValueError, match=message):
    for run in reading.read_runs(path):
      tool.forecast_run(run, forecasters, 5)
  assert not (tmp_path / "bad-forecast.png").exists()


def test_cutoff_outside_the_forecasters_range_is_refused():
  forecasters = _forecasters()
  run = reading.Run({}, _curve(12))
  with pytest.raises(ValueError, match="trained on cutoffs 5..8"):
    tool.forecast_run(run, forecasters, 10)
  assert tool.forecast_run(run, forecasters)["cutoff"] == 8  # the latest it knows
  with pytest.raises(ValueError, match="has 4 epochs; the forecaster needs at least 5"):
    tool.forecast_run(reading.Run({}, _curve(4)), forecasters)


def test_epochs_counted_from_zero_and_list_valued_tags_are_read(tmp_path):
  rows = [(e - 1, *rest) for e, *rest in _csv_rows(6)]
  (run,) = reading.read_runs(_write_csv(tmp_path / "keras.csv", rows))
  assert run.epochs == 6 and run.metrics["val/accuracy"][0] == rows[0][1]
  folder = tmp_path / "run"
  folder.mkdir()
  records = [{"hidden": [32, 32], "seed": s, "epoch": e, "val/accuracy": 0.5} for s in (0, 1) for e in (1, 2)]
  (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
  assert [r.tags for r in reading.read_runs(folder)] == [{"hidden": "[32, 32]", "seed": 0}, {"hidden": "[32, 32]", "seed": 1}]


def test_a_run_with_some_summary_columns_is_refused():
  runs = _runs()
  runs[0].metrics["signals/loss_q50"] = np.ones(14)
  with pytest.raises(ValueError, match=r"lacks the metric column\(s\) signals/loss_q10"):
    table.build_table(runs, (4,), 5)


def test_probability_of_help_from_a_corpus_where_more_epochs_never_help():
  flat = [reading.Run({"lr": c, "seed": s}, _curve(14, np.full(14, 0.5 + 0.01 * c))) for c in range(4) for s in range(2)]
  forecaster = models.fit_forecaster(table.build_table(flat, (4, 6), 5), "curve", folds=2)
  row = features.curve_features(_curve(14, np.full(14, 0.5)), 6, 14, 5)
  assert forecaster.predict(row)["helps_probability"] == 0.0


def test_retraining_on_a_corpus_of_one_configuration_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"cutoffs": [4, 6], "horizon": 5}))
  records = [{"dataset": "d", "lr": 0.1, "seed": s, "epoch": e, **{k: float(v[e - 1]) for k, v in _curve(14).items()}}
             for s in (0, 1, 2) for e in range(1, 15)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
  with pytest.raises(ValueError, match="needs at least 2 groups, but the corpus has 1 .*several configurations"):
    tool.retrain(tmp_path, ("curve",))
  with pytest.raises(ValueError, match="lack the per-sample summaries"):
    tool.retrain(tmp_path, ("full",))


def test_missing_input_gets_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    reading.read_runs(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    reading.read_runs(tmp_path / "none.csv")
  (tmp_path / "m.txt").write_text("x")
  with pytest.raises(ValueError, match="neither .jsonl nor .csv"):
    reading.read_runs(tmp_path / "m.txt")
