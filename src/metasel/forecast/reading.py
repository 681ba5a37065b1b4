"""Per-epoch metrics of training runs, read from a metasel run folder, a JSONL file or a CSV file from any
framework, as one `Run` (identifying tags, one array per metric) per run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["ALIASES", "Run", "read_records", "group_runs", "read_runs", "check_run"]

EPOCH = "epoch"
# Column names other tools use for the curve's metrics, mapped to metasel's.
ALIASES = {
    "val/accuracy": ("val_accuracy", "val_acc", "valid_accuracy", "validation_accuracy", "eval_accuracy"),
    "val/loss": ("val_loss", "valid_loss", "validation_loss", "eval_loss"),
    "train/mean_loss": ("train/loss", "train_loss", "loss", "training_loss"),
}
_CANONICAL = {alias: name for name, aliases in ALIASES.items() for alias in aliases}


class Run(NamedTuple):
  """One run's per-epoch metrics: `tags` tell it apart from the others in its file (e.g. seed, dataset);
  `metrics` maps a column to its values at epochs 1..T."""

  tags: dict
  metrics: dict[str, np.ndarray]

  @property
  def epochs(self) -> int:
    return len(next(iter(self.metrics.values()))) if self.metrics else 0

  def name(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.tags.items()) or "run"


def _canonical(record: dict) -> dict:
  """The record with aliased column names renamed to metasel's (an existing metasel name wins)."""
  renamed = {}
  for key, value in record.items():
    name = _CANONICAL.get(key, key)
    if name not in renamed or name == key:
      renamed[name] = value
  return renamed


def _number(value, where: str) -> float:
  if isinstance(value, bool) or value is None:
    raise ValueError(f"{where}: expected a number, got {value!r}")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _read_jsonl(path: Path) -> list[dict]:
  records = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} line {number} is not a JSON object ({err}): {line[:80]!r}") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path} line {number} is not a JSON object: {line[:80]!r}")
    records.append(record)
  return records


def _read_csv(path: Path, by: tuple[str, ...]) -> list[dict]:
  """CSV rows as records: `by` columns (the run tags) kept as text, every other cell a number (empty: NaN)."""
  with path.open(newline="") as f:
    reader = csv.DictReader(f, restkey="\0extra")
    if not reader.fieldnames:
      raise ValueError(f"{path} is empty; expected a header row naming the columns")
    records = []
    for number, row in enumerate(reader, 2):
      if "\0extra" in row or None in row.values():
        fields = len([v for k, v in row.items() if k != "\0extra" and v is not None]) + len(row.get("\0extra", []))
        raise ValueError(f"{path} row {number} has {fields} fields where the header has {len(reader.fieldnames)};"
                         " expected one value per column")
      records.append({
          key: value if key in by else (math.nan if value.strip() == "" else _number(value, f"{path} row {number}, column {key!r} (columns that name runs go in --by)"))
          for key, value in row.items()
      })
  return records


def read_records(path: str | Path, by: tuple[str, ...] = ()) -> list[dict]:
  """Every record of a run folder (its metrics.jsonl), a .jsonl file or a .csv file, with canonical column names."""
  path = Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"no metrics.jsonl in {path.parent}; expected a metasel run folder, or a .jsonl or .csv file")
  elif not path.exists():
    raise FileNotFoundError(f"{path} does not exist; expected a metasel run folder, or a .jsonl or .csv file")
  if path.suffix == ".csv":
    return [_canonical(r) for r in _read_csv(path, by)]
  if path.suffix != ".jsonl":
    raise ValueError(f"{path} is neither .jsonl nor .csv; expected per-epoch metrics in one of those")
  return [_canonical(r) for r in _read_jsonl(path)]


def _tag_keys(record: dict, by: tuple[str, ...] | None) -> tuple[str, ...]:
  """The keys that identify a record's run: `by` when given, else every key but the epoch, the step and metrics
  (names with a "/")."""
  if by is not None:
    return by
  return tuple(k for k in record if k not in (EPOCH, "step") and "/" not in k)


def group_runs(records: list[dict], by: tuple[str, ...] | None = None) -> list[Run]:
  """Epoch records (those with an "epoch") grouped into runs by their tags, in order of first appearance.

  Each run's epochs must be 1, 2, ..., T (or 0, 1, ..., T - 1, as Keras counts them, read as 1, ..., T); a
  repeated or missing epoch is an error naming the run.
  """
  runs: dict[tuple, list[dict]] = {}
  for record in records:
    if EPOCH not in record:
      continue
    keys = _tag_keys(record, by)
    missing = [k for k in keys if k not in record]
    if missing:
      raise ValueError(f"an epoch record lacks the run column(s) {missing}: {record}")
    tags = tuple((k, json.dumps(record[k]) if isinstance(record[k], (list, dict)) else record[k]) for k in keys)
    runs.setdefault(tags, []).append(record)
  if not runs:
    raise ValueError("no per-epoch records found: expected records with an 'epoch' column")
  result = []
  for tags, rows in runs.items():
    tags = dict(tags)
    epochs = [_number(r[EPOCH], f"run {tags or 'run'}: epoch") for r in rows]
    if epochs == list(range(len(rows))):
      epochs = [e + 1 for e in epochs]  # counted from 0
    if epochs != list(range(1, len(rows) + 1)):
      name = Run(tags, {}).name()
      raise ValueError(
          f"{name}: epochs are {epochs[:12]}{'...' if len(epochs) > 12 else ''}; expected 1, 2, ... once each"
          " (several runs in one file need columns that tell them apart: pass --by)"
      )
    columns = sorted({k for r in rows for k in r if "/" in k})
    metrics = {c: np.array([_number(r.get(c, math.nan), f"{Run(tags, {}).name()}, epoch {e:g}, column {c!r}")
                            for r, e in zip(rows, epochs)]) for c in columns}
    result.append(Run(tags, metrics))
  return result


def read_runs(path: str | Path, by: tuple[str, ...] | None = None) -> list[Run]:
  """The runs of a metasel run folder, a .jsonl or a .csv file.

  `by` names the columns that tell runs apart. Default: in a metasel run folder, every field of an epoch
  record that is not a metric (no "/") nor the epoch or step (its experiment's tags, e.g. dataset and seed);
  in a file, none (one run).
  """
  path = Path(path)
  if by is None and not path.is_dir():
    by = ()
  return group_runs(read_records(path, by or ()), by)


def check_run(run: Run, cutoff: int, columns: tuple[str, ...]) -> None:
  """A clear error when `run` lacks a column, is shorter than `cutoff`, or has a non-finite value up to it."""
  missing = [c for c in columns if c not in run.metrics]
  if missing:
    accepted = "; ".join(f"{c} (or {', '.join(ALIASES[c])})" if c in ALIASES else c for c in missing)
    raise ValueError(f"{run.name()} lacks the metric column(s) {accepted}; it has {sorted(run.metrics)}")
  if run.epochs < cutoff:
    raise ValueError(f"{run.name()} has {run.epochs} epochs, shorter than the cutoff {cutoff}; forecasting from epoch {cutoff} needs that many")
  for column in columns:
    bad = np.flatnonzero(~np.isfinite(run.metrics[column][:cutoff]))
    if bad.size:
      raise ValueError(f"{run.name()}: {column} is {run.metrics[column][bad[0]]} at epoch {bad[0] + 1}; expected finite values up to the cutoff {cutoff}")
  accuracy = run.metrics.get("val/accuracy")
  if accuracy is not None and (np.any(accuracy[:cutoff] > 1) or np.any(accuracy[:cutoff] < 0)):
    bad = int(np.flatnonzero((accuracy[:cutoff] > 1) | (accuracy[:cutoff] < 0))[0])
    raise ValueError(f"{run.name()}: val/accuracy is {accuracy[bad]} at epoch {bad + 1}; expected a fraction in [0, 1] (a percentage? divide by 100)")
