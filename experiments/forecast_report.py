"""The analysis of `forecast-corpus`: out-of-fold forecasts of every predictor at every cutoff, their skill against
the last value, leave-one-dataset-out, permutation tests of the pipeline and of the per-sample block within
bins of (cutoff, current accuracy), the optimism check, the figure, and the forecaster that ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.dummy import DummyClassifier

from metasel import runs, stats
from metasel.forecast import models, reading, tool, validation
from metasel.forecast.table import Table, build_table, check_cutoffs
from metasel_experiments import ci_text

__all__ = ["check_cutoffs", "corpus_runs", "regression_forecasts", "analyse"]

LEARNED = {"epoch_only": ("epoch", models.boosting), "accuracy_only": ("accuracy", models.boosting),
           "curve_ridge": ("curve", models.ridge), "curve_boosting": ("curve", models.boosting),
           "full_ridge": ("full", models.ridge), "full_boosting": ("full", models.boosting)}
CLASSIFIERS = {"base_rate": ("epoch", lambda: DummyClassifier(strategy="prior")),
               "epoch_only": ("epoch", models.boosting_classifier), "accuracy_only": ("accuracy", models.boosting_classifier),
               "curve_logistic": ("curve", models.logistic), "curve_boosting": ("curve", models.boosting_classifier),
               "full_logistic": ("full", models.logistic), "full_boosting": ("full", models.boosting_classifier)}


def corpus_runs(corpus: list[dict]) -> list[reading.Run]:
  """The corpus units as runs, tagged by configuration and seed."""
  result = []
  for unit in corpus:
    for seed, records in enumerate(unit["records"]):
      columns = sorted(k for k in records[0] if "/" in k)
      result.append(reading.Run({**unit["tags"], "seed": unit["seeds"][seed]}, {c: np.array([r[c] for r in records]) for c in columns}))
  return result


def _last_value(table: Table, target: str) -> np.ndarray:
  """The no-change forecast: no further change of accuracy, a plateau now."""
  return table.cutoffs.astype(np.float64) if target == "plateau" else np.zeros(table.cutoffs.size)


def _scores(y, forecasts: dict, rows, rank_groups) -> dict:
  """MAE, skill against the last value and rank correlation within `rank_groups` of each forecast on `rows`."""
  base = validation.mae(y[rows], forecasts["last_value"][rows])
  result = {}
  for name, prediction in forecasts.items():
    error = validation.mae(y[rows], prediction[rows])
    result[name] = {"mae": error, "skill": validation.skill(error, base), "rank": validation.rank_within(y[rows], prediction[rows], rank_groups[rows])}
  return result


def regression_forecasts(table: Table, splits, target: str) -> dict[str, np.ndarray]:
  """Out-of-fold forecasts of `target` by every predictor: the last value, the power law and the learned models."""
  y = table.targets[target]
  result = {"last_value": _last_value(table, target), "power_law": table.power_law[target]}
  for name, (feature_set, make) in LEARNED.items():
    result[name] = validation.out_of_fold(make(), models.feature_matrix(table, feature_set), y, splits)
  return result


def _per_cutoff(table: Table, function) -> dict:
  """`function(rows)` for each cutoff's rows and for all rows ("all")."""
  result = {str(c): function(table.cutoffs == c) for c in np.unique(table.cutoffs)}
  result["all"] = function(np.ones(table.cutoffs.size, bool))
  return result


def _regression_metrics(table: Table, target: str, forecasts: dict) -> dict:
  """Per cutoff: every forecast's scores, ranks taken within each (dataset, cutoff)."""
  rank_groups = np.char.add(table.datasets.astype(str), np.char.add("|", table.cutoffs.astype(str)))
  return _per_cutoff(table, lambda rows: _scores(table.targets[target], forecasts, rows, rank_groups))


def _full_minus_curve(table: Table, target: str, forecasts: dict, learner: str) -> dict:
  """Per cutoff, the mean over configuration groups of |error full| - |error curve| with a 95% t-interval."""
  y = table.targets[target]
  difference = np.abs(forecasts[f"full_{learner}"] - y) - np.abs(forecasts[f"curve_{learner}"] - y)

  def at(rows):
    group_means = [difference[rows & (table.groups == g)].mean() for g in np.unique(table.groups[rows])]
    return stats.mean_ci(group_means)._asdict()

  return _per_cutoff(table, at)


def _intervals(table: Table, splits, target: str, seed: int) -> dict:
  """Coverage of quantile-boosting intervals (80%, 90%) of the curve and full feature sets, per cutoff."""
  y = table.targets[target]
  result = {}
  for feature_set in ("curve", "full"):
    x = models.feature_matrix(table, feature_set)
    bounds = {q: validation.out_of_fold(models.quantile_boosting(q, seed), x, y, splits) for q in (0.05, 0.1, 0.9, 0.95)}
    result[feature_set] = _per_cutoff(table, lambda rows: {
        "80": validation.coverage(y[rows], bounds[0.1][rows], bounds[0.9][rows]),
        "90": validation.coverage(y[rows], bounds[0.05][rows], bounds[0.95][rows]),
        "width_80": float(np.mean(bounds[0.9][rows] - bounds[0.1][rows])),
    })
  return result


def _tool_interval_coverage(table: Table, splits, folds: int) -> dict:
  """Coverage of the intervals `metasel forecast` prints (curve features: boosting plus the residual quantiles of
  its inner leave-one-dataset-out), each outer split's test rows forecast by a forecaster fitted without them."""
  hits = {target: {level: np.zeros(table.cutoffs.size) for level in models.INTERVALS} for target in models.REGRESSED}
  for train, test in splits:
    forecaster = models.fit_forecaster(table.rows(np.isin(np.arange(table.cutoffs.size), train)), "curve", folds=folds)
    x = models.feature_matrix(table, "curve")[test]
    for target in models.REGRESSED:
      prediction = forecaster.point(target, x)
      for level in models.INTERVALS:
        band = np.array([forecaster.band(target, c, level) for c in table.cutoffs[test]])
        y = table.targets[target][test]
        hits[target][level][test] = (y >= prediction + band[:, 0]) & (y <= prediction + band[:, 1])
  return {target: _per_cutoff(table, lambda rows, t=target: {f"{round(100 * level)}": float(hits[t][level][rows].mean()) for level in models.INTERVALS})
          for target in models.REGRESSED}


def _classification(table: Table, splits) -> dict:
  """AUROC and Brier score of P(gain > 0.5 points) by each classifier; the power law's predicted gain as a score."""
  helps = table.targets["helps"].astype(int)
  scores = {name: validation.out_of_fold(make(), models.feature_matrix(table, fs), helps, splits, "predict_proba")
            for name, (fs, make) in CLASSIFIERS.items()}
  power_law = table.power_law["gain"]

  def at(rows):
    out = {name: {"auroc": validation.auroc(helps[rows], p[rows]), "brier": validation.brier(helps[rows], p[rows])}
           for name, p in scores.items()}
    out["power_law"] = {"auroc": validation.auroc(helps[rows], power_law[rows]),
                        "brier": validation.brier(helps[rows], table.power_law["helps"][rows])}
    out["positive_share"] = float(helps[rows].mean())
    return out

  return _per_cutoff(table, at)


def _leave_one_dataset_out(table: Table, target: str) -> dict:
  """Per held-out dataset: MAE and skill of the ridge and boosting models, and the rank correlation among its runs."""
  y = table.targets[target]
  splits = validation.leave_one_group_out(table.datasets)
  forecasts = {"last_value": _last_value(table, target)}
  for name in ("curve_ridge", "full_ridge", "curve_boosting", "full_boosting"):
    feature_set, make = LEARNED[name]
    forecasts[name] = validation.out_of_fold(make(), models.feature_matrix(table, feature_set), y, splits)
  return {dataset: _scores(y, forecasts, table.datasets == dataset, table.cutoffs) for dataset in np.unique(table.datasets)}


def _permutation_tests(table: Table, splits, target: str, config, seed: int) -> dict:
  """The pipeline tests (full ridge; targets permuted row by row within cutoffs, and whole configurations
  exchanged) and the per-sample block's conditional tests: within bins of (cutoff, current accuracy) with
  ridge, and within bins of (dataset, cutoff, current accuracy) with boosting (`config.boosting_permutations`,
  each one refits every fold)."""
  y = table.targets[target]
  full = models.feature_matrix(table, "full")
  accuracy = models.feature_matrix(table, "accuracy")[:, 0]
  by_cutoff = validation.confound_bins(table.cutoffs, accuracy)
  by_dataset = validation.confound_bins(table.cutoffs, accuracy, strata=table.datasets)
  block = lambda make, bins, n, jobs: validation.conditional_permutation_test(  # noqa: E731
      make(), table.curve, table.sample, y, splits, bins, n, seed, jobs)
  # Ridge fits use one core each: long tests run two at a time. Boosting already uses every core.
  jobs = 2 if config.permutations >= 100 else None
  return {
      "pipeline": validation.permutation_test(models.ridge(), full, y, splits, table.cutoffs, config.permutations, seed, jobs),
      "pipeline_configurations": validation.group_permutation_test(models.ridge(), full, y, splits, table.groups, config.permutations, seed, jobs),
      "per_sample_block": block(models.ridge, by_cutoff, config.permutations, jobs),
      "per_sample_block_within_dataset_boosting": block(models.boosting, by_dataset, config.boosting_permutations, None),
  }


def analyse(corpus: list[dict], config, out_dir: Path, generation: dict) -> dict:
  """Every analysis of the corpus; writes summary.json, forecast.png and forecaster.json."""
  table = build_table(corpus_runs(corpus), config.cutoffs, config.horizon)
  splits = validation.grouped_splits(table.groups, config.folds)
  summary = {"corpus": {"runs": int(table.runs.max() + 1), "groups": int(np.unique(table.groups).size), "rows": int(table.cutoffs.size),
                        "datasets": sorted(set(table.datasets.tolist())), **generation},
             "seeds": list(config.seeds), "targets": {}, "helps": _classification(table, splits)}
  for target in models.REGRESSED:
    forecasts = regression_forecasts(table, splits, target)
    summary["targets"][target] = {
        "metrics": _regression_metrics(table, target, forecasts),
        "full_minus_curve": {learner: _full_minus_curve(table, target, forecasts, learner) for learner in ("ridge", "boosting")},
        "leave_one_dataset_out": _leave_one_dataset_out(table, target),
        "permutation": _permutation_tests(table, splits, target, config, seed=0),
        "optimism": {fs: validation.optimism(models.ridge(), models.feature_matrix(table, fs), table.targets[target], table.groups, config.folds)
                     for fs in ("curve", "full")},
    }
    if target != "plateau":
      summary["targets"][target]["intervals"] = _intervals(table, splits, target, seed=0)
  about = {"experiment": "forecast-corpus", "runs": summary["corpus"]["runs"], "groups": summary["corpus"]["groups"],
           "datasets": summary["corpus"]["datasets"]}
  summary["tool_intervals"] = {"grouped": _tool_interval_coverage(table, splits, config.folds),
                               "leave_one_dataset_out": _tool_interval_coverage(table, validation.leave_one_group_out(table.datasets), config.folds)}
  residuals = {fs: models.interval_residuals(table, fs, config.folds) for fs in models.FEATURE_SETS}
  tool.save_forecaster(out_dir / "forecaster.json", table, residuals, about)
  summary["table"] = _table_text(summary)
  runs.write_json(out_dir / "summary.json", summary)
  _figure(summary, out_dir / "forecast.png")
  return summary


def _table_text(summary: dict) -> str:
  corpus = summary["corpus"]
  lines = [f"corpus: {corpus['runs']} runs, {corpus['groups']} configurations, {len(corpus['datasets'])} datasets;"
           f" training {corpus['seconds_training']:.0f} s",
           "skill vs last value (1 - MAE/MAE_last), grouped CV; full - curve |error| of boosting, mean over configurations"]
  for target, result in summary["targets"].items():
    lines.append(f"{target}:")
    for cutoff, metrics in result["metrics"].items():
      diff = result["full_minus_curve"]["boosting"][cutoff]
      skills = "  ".join(f"{name} {m['skill']:+.2f}" for name, m in metrics.items() if name != "last_value")
      unit = "epochs" if target == "plateau" else "pts"
      lines.append(f"  t0={cutoff:>3}: {skills}  | full-curve {ci_text(diff, 1 if target == 'plateau' else 100, True)} {unit}")
    perm = result["permutation"]
    lines.append(f"  p pipeline {perm['pipeline']['p']:.3f} (rows), {perm['pipeline_configurations']['p']:.3f} (configurations); per-sample block within (t0, acc) bins {perm['per_sample_block']['p']:.3f}"
                 f" (ridge); within (dataset, t0, acc) bins {perm['per_sample_block_within_dataset_boosting']['p']:.3f} (boosting)")
    lodo = result["leave_one_dataset_out"]
    lines.append("  leave one dataset out, skill curve / full boosting: " + ", ".join(
        f"{d} {m['curve_boosting']['skill']:+.2f} / {m['full_boosting']['skill']:+.2f}" for d, m in lodo.items()))
  helps = summary["helps"]["all"]
  lines.append("helps (gain > 0.5 pts): " + "  ".join(
      f"{name} AUROC {m['auroc']:.2f} Brier {m['brier']:.3f}" for name, m in helps.items() if isinstance(m, dict)))
  return "\n".join(lines)


def _figure(summary: dict, path: Path) -> None:
  plt = runs.pyplot()
  targets = list(summary["targets"])
  fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4.2 * (len(targets) + 1), 3.4))
  for ax, target in zip(axes, targets):
    metrics = summary["targets"][target]["metrics"]
    cutoffs = [c for c in metrics if c != "all"]
    for name in metrics[cutoffs[0]]:
      if name != "last_value":
        ax.plot([int(c) for c in cutoffs], [metrics[c][name]["skill"] for c in cutoffs], marker="o", label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="cutoff epoch", ylabel="skill vs last value", title=target)
  helps = summary["helps"]
  cutoffs = [c for c in helps if c != "all"]
  for name in helps[cutoffs[0]]:
    if name != "positive_share":
      axes[-1].plot([int(c) for c in cutoffs], [helps[c][name]["auroc"] for c in cutoffs], marker="o", label=name)
  axes[-1].set(xlabel="cutoff epoch", ylabel="AUROC", title="gain > 0.5 points")
  axes[0].legend(fontsize=6)
  axes[-1].legend(fontsize=6)
  runs.save_figure(fig, path)
