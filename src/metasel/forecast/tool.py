"""`metasel forecast`: forecasts of a user's runs (their curve so far, and per-sample summaries where logged)
from the shipped forecaster or one retrained on a corpus folder, printed and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metasel import checks, runs
from metasel.forecast import features, models, reading
from metasel.forecast.models import FEATURE_SETS
from metasel.forecast.table import Table, build_table, load_table, save_table

__all__ = ["SHIPPED", "save_forecaster", "load_forecasters", "retrain", "forecast_run", "format_forecast", "describe_source",
           "command", "plot_forecasts"]


SHIPPED = Path(__file__).with_name("forecaster.json")
TABLE_FILE = "forecast_table.npz"  # beside a forecaster.json: the corpus table its models are fitted on


def save_forecaster(path: str | Path, table: Table, residuals: dict[str, dict], corpus: dict) -> None:
  """Write a forecaster: the corpus table (`TABLE_FILE`, beside `path`) and, in `path`, the interval residuals
  of each feature set and a description of the corpus. Its models are refitted from the table when loaded."""
  path = Path(path)
  save_table(path.with_name(TABLE_FILE), table)
  runs.write_json(path, {"corpus": corpus, "residuals": residuals})


def load_forecasters(path: str | Path = SHIPPED, feature_sets=FEATURE_SETS) -> dict[str, models.Forecaster]:
  """The forecasters of a forecaster.json and its table (default: those shipped with metasel, from the
  forecast-corpus run), fitted for each of `feature_sets` (a few seconds)."""
  path = Path(path)
  if not path.exists() or not path.with_name(TABLE_FILE).exists():
    raise FileNotFoundError(f"no forecaster {path} with {TABLE_FILE} beside it; expected the forecaster.json of a `metasel run forecast-corpus` folder")
  stored = json.loads(path.read_text())
  if not isinstance(stored, dict) or "residuals" not in stored:
    raise ValueError(f"{path} holds no interval residuals; expected the forecaster.json of a `metasel run forecast-corpus` folder")
  table = load_table(path.with_name(TABLE_FILE))
  return {fs: models.fit_forecaster(table, fs, stored["residuals"][fs], corpus=stored.get("corpus", {}))
          for fs in feature_sets if fs in stored["residuals"]}


def retrain(corpus_dir: str | Path, feature_sets=FEATURE_SETS, folds: int = 5) -> dict[str, models.Forecaster]:
  """Forecasters trained afresh on the runs of a corpus folder (`metasel run forecast-corpus`), at its config's
  cutoffs and horizon, intervals included."""
  corpus_dir = Path(corpus_dir)
  config_path = corpus_dir / "config.json"
  config = json.loads(config_path.read_text()) if config_path.exists() else {}
  if not config.get("cutoffs") or not config.get("horizon"):
    raise ValueError(f"{corpus_dir} has no config.json with cutoffs and horizon; expected a forecast-corpus run folder")
  table = build_table(reading.read_runs(corpus_dir), config["cutoffs"], config["horizon"])
  about = {"source": str(corpus_dir), "runs": int(table.runs.max() + 1), "groups": int(np.unique(table.groups).size)}
  if "full" in feature_sets and np.isnan(table.sample).any():
    raise ValueError(f"the runs of {corpus_dir} lack the per-sample summaries (signals/NAME columns) that 'full' features need")
  folds = max(2, min(folds, np.unique(table.groups).size))  # a small corpus gets fewer folds; one group is refused
  return {fs: models.fit_forecaster(table, fs, folds=folds, corpus=about) for fs in feature_sets}


def forecast_run(run: reading.Run, forecasters: dict[str, models.Forecaster], cutoff: int | None = None,
                 feature_set: str = "curve") -> dict:
  """One run's forecast at `cutoff` (default: its last epoch, or the forecaster's latest cutoff if that is
  earlier) by the forecaster of `feature_set`: "curve" (the default: it transfers best to unseen datasets), or
  "full", which needs the run's per-sample summaries (`signals.SUMMARY_NAMES` as "signals/NAME" columns)."""
  if feature_set not in forecasters:
    raise ValueError(f"no {feature_set!r} forecaster; expected one of {sorted(forecasters)}")
  forecaster = forecasters[feature_set]
  has_samples = feature_set == "full"
  if cutoff is None and run.epochs < min(forecaster.cutoffs):
    raise ValueError(f"{run.name()} has {run.epochs} epochs; the forecaster needs at least {min(forecaster.cutoffs)} (its earliest cutoff)")
  cutoff = min(run.epochs, max(forecaster.cutoffs)) if cutoff is None else cutoff
  checks.check_int("cutoff", cutoff)
  reading.check_run(run, cutoff, features.CURVE_COLUMNS + (features.SAMPLE_COLUMNS if has_samples else ()))
  low, high = min(forecaster.cutoffs), max(forecaster.cutoffs)
  if not low <= cutoff <= high:
    raise ValueError(
        f"{run.name()}: cannot forecast from epoch {cutoff}; the forecaster was trained on cutoffs {low}..{high}"
        f" of {forecaster.budget}-epoch runs (pass --cutoff within that range)"
    )
  row = features.curve_features(run.metrics, cutoff, forecaster.budget, forecaster.horizon)
  if has_samples:
    row.update(features.sample_features(run.metrics, cutoff))
  return {"run": run.name(), "cutoff": cutoff, "epochs": run.epochs, "feature_set": forecaster.feature_set, "budget": forecaster.budget,
          "horizon": forecaster.horizon, "accuracy": row["accuracy"], **forecaster.predict(row)}


def format_forecast(result: dict) -> str:
  """A few lines per run: the forecast final accuracy, the gain of `horizon` more epochs, the plateau."""
  def band(name, scale=100.0, digits=1):
    low, high = result[f"{name}_intervals"][0.8]
    return f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]"

  later = f" (of {result['epochs']} logged)" if result["epochs"] > result["cutoff"] else ""
  return "\n".join([
      f"{result['run']} at epoch {result['cutoff']}{later} ({result['feature_set']} features): accuracy {100 * result['accuracy']:.1f}%",
      f"  final accuracy at epoch {result['budget']}: {100 * result['final']:.1f}% (80% interval {band('final')})",
      f"  gain of {result['horizon']} more epochs: {100 * result['gain']:+.1f} points {band('gain')};"
      f" P(gain > 0.5 points) = {result['helps_probability']:.2f}",
      f"  plateau at epoch {result['plateau']:.0f} {band('plateau', 1.0, 0)} (censored at {result['budget']})",
  ])


def describe_source(forecasters: dict[str, models.Forecaster], corpus_dir=None, forecaster_file=None) -> str:
  """Which forecaster answers (the shipped one, a given file's, or one retrained on a corpus folder) and what
  it was trained on."""
  about = next(iter(forecasters.values())).corpus
  trained = f"{about.get('runs', '?')} runs of {about.get('groups', '?')} configurations"
  if corpus_dir is not None:
    return f"forecaster: retrained on {corpus_dir} ({trained})"
  if forecaster_file is not None:
    return f"forecaster: {forecaster_file}, trained on {trained}"
  return f"forecaster: shipped with metasel, trained on {trained} of `metasel run forecast-corpus` ({', '.join(about.get('datasets', []))})"


def command(path, cutoff: int | None = None, by: tuple[str, ...] | None = None, corpus_dir=None, forecaster_file=None,
            plot: str | Path | None = None, feature_set: str = "curve", max_plots: int = 6) -> str:
  """`metasel forecast PATH`: every run's forecast as text; the first `max_plots` runs plotted to `plot`
  (default: forecast.png in the run folder, or beside the metrics file). Every input is read and checked,
  and every forecast made, before anything is written."""
  path = Path(path)
  checks.check_choice("features", feature_set, FEATURE_SETS)
  run_list = reading.read_runs(path, by)
  sets = (feature_set,)
  forecasters = retrain(corpus_dir, sets) if corpus_dir is not None else load_forecasters(forecaster_file or SHIPPED, sets)
  results = [forecast_run(run, forecasters, cutoff, feature_set) for run in run_list]
  plot = Path(plot) if plot is not None else (path / "forecast.png" if path.is_dir() else path.with_name(f"{path.stem}-forecast.png"))
  shown = min(len(results), max_plots)
  plot_forecasts(run_list[:shown], results[:shown], plot)
  lines = [describe_source(forecasters, corpus_dir, forecaster_file), *map(format_forecast, results)]
  lines.append(f"plot of {shown} of {len(results)} runs: {plot}")
  return "\n".join(lines)


def plot_forecasts(run_list: list[reading.Run], results: list[dict], path: str | Path) -> None:
  """One panel per run: the validation accuracy so far, the forecast band to the budget, the predicted plateau."""
  plt = runs.pyplot()
  count = len(results)
  fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.4), squeeze=False)
  for ax, run, result in zip(axes[0], run_list, results):
    cutoff, budget = result["cutoff"], result["budget"]
    epochs = np.arange(1, cutoff + 1)
    ax.plot(epochs, 100 * run.metrics["val/accuracy"][:cutoff], color="k", label="validation accuracy")
    ahead = np.linspace(cutoff, budget, 50)
    frac = (ahead - cutoff) / max(budget - cutoff, 1)
    for level, alpha in ((0.9, 0.15), (0.8, 0.3)):
      low, high = result["final_intervals"][level]
      ax.fill_between(ahead, 100 * (result["accuracy"] + frac * (low - result["accuracy"])),
                      100 * (result["accuracy"] + frac * (high - result["accuracy"])), color="C0", alpha=alpha,
                      label=f"{int(100 * level)}% band", linewidth=0)
    ax.plot(ahead, 100 * (result["accuracy"] + frac * result["final_change"]), color="C0", ls="--", label="forecast")
    ax.axvline(result["plateau"], color="C3", ls=":", label="predicted plateau")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=result["run"][:40])
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  runs.save_figure(fig, path)
