"""Run folders: `results/<experiment>/<run-id>/` with config, metrics lines and summary, written safely.

Every file is written atomically (a temporary file renamed into place), so an interrupted run never
leaves a half-written JSON file, and an existing run folder is never overwritten. An experiment runs
as finished units of work (a seed of a dataset, one method's runs, ...) kept in `units/`, so that a
killed run resumes (`open_run` on its folder) from its last finished unit and ends with the same
numbers. With several processes only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "new_run_dir", "write_json", "save_npz", "to_jsonable", "MetricsLog", "Units", "open_run", "writes", "pyplot",
    "save_figure",
    "environment", "compiled_memory_mb",
]

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
  """Plain-Python version of `value` (numpy/jax scalars and arrays, dataclasses, tuples) for JSON."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_jsonable(dataclasses.asdict(value))
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings
  return value


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def writes() -> bool:
  """Whether this process writes results: always with one process, only process 0 with several."""
  from metasel import parallel

  return parallel.is_main_process()


def _agreed(flag: bool, what: str) -> bool:
  """`flag`, checked to be the same on every process (one collective); a clear error on all of them where not."""
  import jax

  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32)))
  if flags.min() != flags.max():
    raise ValueError(
        f"processes disagree on {what} (per process: {flags.tolist()}); expected one run folder that every process sees"
    )
  return flag


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
  """Write `path` through a temporary file renamed into place, so a reader never sees half of it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give results the usual mode
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _json_text(value: Any) -> str:
  return json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Write `value` as indented JSON to `path` atomically (process 0 only)."""
  if writes():
    _write_atomic(Path(path), lambda f: f.write(_json_text(value)), "w")


def new_run_dir(root: str | os.PathLike, experiment: str, run_id: str | None = None) -> Path:
  """Create and return a fresh `root/experiment/run_id` folder; never reuses an existing one.

  With several processes every one must be given the same `run_id`; only process 0 creates the folder.
  """
  if run_id is None:
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  path = Path(root) / experiment / run_id
  created = False
  if writes():
    try:
      path.mkdir(parents=True, exist_ok=False)
      created = True
    except FileExistsError:
      pass
  if not _created_everywhere(created):
    raise FileExistsError(
        f"run folder {path} already exists; choose another run id (existing results are never overwritten)"
    )
  return path


def _created_everywhere(created: bool) -> bool:
  """Process 0's `created`, told to every process (so that all of them stop when it could not make the folder)."""
  import jax

  if jax.process_count() == 1:
    return created
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(created, np.int32)))


class MetricsLog:
  """Appends one JSON object per line to `metrics.jsonl`, flushing each write so a crash loses none."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if writes():
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, record: dict[str, Any]) -> None:
    self.write_lines([line_of(record)])

  def write_lines(self, lines: list[str]) -> None:
    """Append ready JSON lines in one write (process 0 only)."""
    if lines and writes():
      with self.path.open("a") as f:
        f.write("".join(line + "\n" for line in lines))

  def lines(self) -> list[str]:
    """The file's lines as written (none when it does not exist yet)."""
    return self.path.read_text().splitlines() if self.path.exists() else []

  def read(self) -> list[dict[str, Any]]:
    """Every record; a line that is not JSON is an error naming its line number."""
    records = []
    for number, line in enumerate(self.lines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as err:
        raise ValueError(f"{self.path} line {number} is not a JSON object ({err}): {line[:80]!r}") from None
    return records


def line_of(record: dict[str, Any]) -> str:
  """A metrics record as its one JSON line."""
  return json.dumps(to_jsonable(record), sort_keys=True)


class Units:
  """The finished units of work of a run folder (`units/`), each with its result and its metrics lines.

  `run(key, compute)` calls `compute(log)` once per key over the life of the folder: a unit found
  finished returns its stored result without computing. A unit's lines reach `metrics.jsonl` when it
  finishes, after its result is stored, so the file holds exactly the finished units' lines in the order
  they finished; opening the folder again restores that (`_reconcile_metrics`). With several processes,
  every one must see the folder, and all of them agree on each unit before computing it.
  """

  def __init__(self, out_dir: str | os.PathLike, metrics: MetricsLog):
    self.dir = Path(out_dir) / "units"
    self.metrics = metrics
    finished = self.finished()
    self._count = len(finished)
    if writes():
      _reconcile_metrics(metrics, [line for unit in finished for line in unit["lines"]])

  def path(self, key: str) -> Path:
    """The unit's file: a readable slug of the key and a short hash (keys may hold paths)."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[-80:]
    return self.dir / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pkl"

  def finished(self) -> list[dict[str, Any]]:
    """The stored units, in the order they finished."""
    units = [pickle.loads(path.read_bytes()) for path in self.dir.glob("*.pkl")] if self.dir.exists() else []
    return sorted(units, key=lambda unit: unit["index"])

  def run(self, key: str, compute: Callable[[Callable[[dict[str, Any]], None]], T]) -> T:
    """`compute(log)`'s result for this key, stored on first completion; `log` collects its metrics records."""
    path = self.path(key)
    if _agreed(path.exists(), f"whether unit {key!r} is finished"):
      unit = pickle.loads(path.read_bytes())
      if unit["key"] != key:
        raise ValueError(f"{path} holds unit {unit['key']!r}, not {key!r}; the run folder's units/ is corrupt")
      return unit["result"]
    lines: list[str] = []
    result = compute(lambda record: lines.append(line_of(record)))
    unit = {"key": key, "index": self._count, "result": result, "lines": lines}
    self._count += 1
    if writes():
      _write_atomic(path, lambda f: pickle.dump(unit, f), "wb")
    self.metrics.write_lines(lines)
    return result


def _reconcile_metrics(metrics: MetricsLog, expected: list[str]) -> None:
  """Make `metrics.jsonl` the finished units' lines: append those a kill kept from it; a file that is not a
  prefix of them (a line cut short by the kill) is kept beside it as `metrics.jsonl.before-resume-N`."""
  present = metrics.lines()
  if present == expected[: len(present)]:
    metrics.write_lines(expected[len(present):])
    return
  number = 1 + len(list(metrics.path.parent.glob(f"{metrics.path.name}.before-resume-*")))
  os.replace(metrics.path, metrics.path.with_name(f"{metrics.path.name}.before-resume-{number}"))
  _write_atomic(metrics.path, lambda f: f.write("".join(line + "\n" for line in expected)), "w")


def save_npz(path: str | os.PathLike, **arrays) -> None:
  """Write `arrays` as a compressed .npz to `path` atomically (process 0 only)."""
  if writes():
    _write_atomic(Path(path), lambda f: np.savez_compressed(f, **arrays), "wb")


def open_run(out_dir: str | os.PathLike, config: Any) -> tuple[MetricsLog, Units]:
  """Start or resume an experiment's run folder: its config, metrics log and finished units.

  A fresh folder gets `config.json`; a folder that has one must have been started with the same config
  (a clear error otherwise), and its files are kept as they are.
  """
  out_dir = Path(out_dir)
  config_path = out_dir / "config.json"
  text = _json_text(config)
  if _agreed(config_path.exists(), f"whether {config_path} exists"):
    if config_path.read_text() != text:
      raise ValueError(
          f"{out_dir} was started with another configuration ({config_path}); expected the same settings to resume it"
      )
  else:
    write_json(config_path, config)
  metrics = MetricsLog(out_dir / "metrics.jsonl")
  return metrics, Units(out_dir, metrics)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend, which writes files without a display."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | os.PathLike) -> None:
  """Lay out, save as PNG (process 0 only) and close a matplotlib figure."""
  fig.tight_layout()
  if writes():
    fig.savefig(path, dpi=110)
  pyplot().close(fig)


def environment() -> dict[str, str]:
  """Where numbers were measured: JAX's backend, the first device's kind and the JAX version."""
  import jax

  return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__}


def compiled_memory_mb(compiled) -> float | None:
  """Megabytes a compiled JAX program needs beyond its arguments (temporaries plus outputs), by XLA's own
  analysis (the CPU backend keeps no allocator statistics); None where the backend gives no analysis."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20
