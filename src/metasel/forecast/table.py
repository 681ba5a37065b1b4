"""The forecasting table of a corpus of finished runs: one row per (run, cutoff), with curve features, per-sample
summary features, targets, the power-law baseline and the groups that validation keeps together."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metasel import checks, runs
from metasel.forecast import features, reading
from metasel.forecast import targets as targets_lib

__all__ = ["Table", "TARGETS", "check_cutoffs", "build_table", "power_law_forecast", "save_table", "load_table"]

TARGETS = ("final", "final_change", "gain", "helps", "plateau", "plateau_observed")


class Table(NamedTuple):
  """R rows, one per (run, cutoff).

  Attributes:
    curve: (R, len(CURVE_FEATURES)). sample: (R, len(SAMPLE_FEATURES)), NaN where a run has no summaries.
    targets: target name -> (R,). power_law: target name -> (R,) the pow3 extrapolation's forecast.
    groups: (R,) the configuration (every tag but the seed): a run's seeds and cutoffs share one group.
    datasets: (R,) the dataset tag. cutoffs: (R,). runs: (R,) index of the run.
    budget, horizon: the runs' length and the gain's horizon.
  """

  curve: np.ndarray
  sample: np.ndarray
  targets: dict[str, np.ndarray]
  power_law: dict[str, np.ndarray]
  groups: np.ndarray
  datasets: np.ndarray
  cutoffs: np.ndarray
  runs: np.ndarray
  budget: int
  horizon: int

  def rows(self, mask: np.ndarray) -> "Table":
    """The table restricted to the rows where `mask` is true."""
    pick = lambda a: a[mask]  # noqa: E731
    return self._replace(
        curve=pick(self.curve), sample=pick(self.sample), targets={k: pick(v) for k, v in self.targets.items()},
        power_law={k: pick(v) for k, v in self.power_law.items()}, groups=pick(self.groups),
        datasets=pick(self.datasets), cutoffs=pick(self.cutoffs), runs=pick(self.runs),
    )


def check_cutoffs(cutoffs, horizon: int, budget: int) -> None:
  """Cutoffs must be distinct epochs >= 2 with cutoff + horizon within the budget."""
  checks.check_int("horizon", horizon)
  if not cutoffs or len(set(cutoffs)) != len(cutoffs):
    raise ValueError(f"cutoffs must be distinct epochs, got {cutoffs!r}")
  for cutoff in cutoffs:
    checks.check_int("cutoff", cutoff, minimum=2)
    if cutoff + horizon > budget:
      raise ValueError(f"cutoff {cutoff} + horizon {horizon} is past the budget of {budget} epochs; expected at most {budget}")


def power_law_forecast(curve: dict[str, np.ndarray], cutoff: int, budget: int, horizon: int, params=None) -> dict[str, float]:
  """The pow3 baseline: the curve fitted up to the cutoff (or given pow3 `params`) and extrapolated to the
  budget, read as a finished run."""
  accuracy = np.asarray(curve["val/accuracy"], np.float64)[:cutoff]
  params = features.fit_pow3(np.arange(1, cutoff + 1), accuracy) if params is None else params
  extrapolated = np.concatenate([accuracy, features.pow3(np.arange(cutoff + 1, budget + 1), *params)])
  now = targets_lib.level(accuracy, cutoff)
  predicted_gain = targets_lib.gain(extrapolated, cutoff, horizon)
  final = targets_lib.final_accuracy(extrapolated)
  return {"final": final, "final_change": final - now, "gain": predicted_gain,
          "helps": float(predicted_gain > targets_lib.HELPS_MARGIN), "plateau": float(targets_lib.plateau_epoch(extrapolated)[0])}


def build_table(runs: list[reading.Run], cutoffs, horizon: int, dataset_tag: str = "dataset", seed_tag: str = "seed") -> Table:
  """The table of finished runs of one budget (every run as long as the first), at each cutoff.

  Runs without the per-sample summary columns get NaN sample features. A clear error names a run that is
  shorter than the others, lacks a curve column, has only some of the summary columns, or has a non-finite
  value.
  """
  if not runs:
    raise ValueError("the corpus holds no runs")
  budget = runs[0].epochs
  check_cutoffs(tuple(cutoffs), horizon, budget)
  columns = {name: [] for name in ("curve", "sample", "groups", "datasets", "cutoffs", "runs")}
  target_rows, baseline_rows = [], []
  for index, run in enumerate(runs):
    if run.epochs != budget:
      raise ValueError(f"{run.name()} has {run.epochs} epochs where the corpus's first run has {budget}; expected one budget")
    has_samples = any(c in run.metrics for c in features.SAMPLE_COLUMNS)
    reading.check_run(run, budget, features.CURVE_COLUMNS + (features.SAMPLE_COLUMNS if has_samples else ()))
    group = reading.Run({k: v for k, v in run.tags.items() if k != seed_tag}, {}).name()
    for cutoff in cutoffs:
      curve = features.curve_features(run.metrics, cutoff, budget, horizon)
      columns["curve"].append([curve[name] for name in features.CURVE_FEATURES])
      sample = features.sample_features(run.metrics, cutoff) if has_samples else {}
      columns["sample"].append([sample.get(name, np.nan) for name in features.SAMPLE_FEATURES])
      columns["groups"].append(group)
      columns["datasets"].append(str(run.tags.get(dataset_tag, "")))
      columns["cutoffs"].append(cutoff)
      columns["runs"].append(index)
      target_rows.append(targets_lib.targets(run.metrics["val/accuracy"], cutoff, horizon))
      pow3 = (curve["pow3_c"], curve["pow3_a"], curve["pow3_alpha"])
      baseline_rows.append(power_law_forecast(run.metrics, cutoff, budget, horizon, pow3))
  return Table(
      curve=np.asarray(columns["curve"], np.float64), sample=np.asarray(columns["sample"], np.float64),
      targets={k: np.array([row[k] for row in target_rows]) for k in TARGETS},
      power_law={k: np.array([row[k] for row in baseline_rows]) for k in baseline_rows[0]},
      groups=np.asarray(columns["groups"]), datasets=np.asarray(columns["datasets"]),
      cutoffs=np.asarray(columns["cutoffs"]), runs=np.asarray(columns["runs"]), budget=budget, horizon=horizon,
  )


_ROW_ARRAYS = ("curve", "sample", "groups", "datasets", "cutoffs", "runs")


def save_table(path, table: Table) -> None:
  """Write a table as a compressed .npz (its targets and baselines as "target/NAME" and "power_law/NAME")."""
  arrays = {name: getattr(table, name) for name in _ROW_ARRAYS}
  arrays.update({f"target/{k}": v for k, v in table.targets.items()})
  arrays.update({f"power_law/{k}": v for k, v in table.power_law.items()})
  runs.save_npz(path, budget=np.asarray(table.budget), horizon=np.asarray(table.horizon), **arrays)


def load_table(path) -> Table:
  """A table written by `save_table`; a clear error for a file that is not one."""
  with np.load(path, allow_pickle=False) as stored:
    names = set(stored.files)
    needed = {*_ROW_ARRAYS, "budget", "horizon"} | {f"target/{k}" for k in TARGETS}
    if needed - names:
      raise ValueError(f"{path} lacks {sorted(needed - names)}; expected a table written by save_table")
    return Table(
        curve=stored["curve"], sample=stored["sample"],
        targets={k: stored[f"target/{k}"] for k in TARGETS},
        power_law={n.split("/", 1)[1]: stored[n] for n in names if n.startswith("power_law/")},
        groups=stored["groups"], datasets=stored["datasets"], cutoffs=stored["cutoffs"], runs=stored["runs"],
        budget=int(stored["budget"]), horizon=int(stored["horizon"]),
    )
