"""Run folders: `results/<experiment>/<run-id>/` with config, metrics lines and summary, written safely.

Every file is written atomically (a temporary file renamed into place), so an interrupted run never
leaves a half-written JSON file, and an existing run folder is never overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["new_run_dir", "write_json", "to_jsonable", "MetricsLog", "pyplot", "save_figure", "environment"]


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


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Write `value` as indented JSON to `path` atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(to_jsonable(value), f, indent=2, sort_keys=True)
      f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give results the usual mode
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def new_run_dir(root: str | os.PathLike, experiment: str, run_id: str | None = None) -> Path:
  """Create and return a fresh `root/experiment/run_id` folder; never reuses an existing one."""
  if run_id is None:
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  path = Path(root) / experiment / run_id
  try:
    path.mkdir(parents=True, exist_ok=False)
  except FileExistsError:
    raise FileExistsError(
        f"run folder {path} already exists; choose another run id (existing results are never overwritten)"
    ) from None
  return path


class MetricsLog:
  """Appends one JSON object per line to `metrics.jsonl`, flushing each line so a crash loses none."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(to_jsonable(record), sort_keys=True) + "\n")

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend, which writes files without a display."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | os.PathLike) -> None:
  """Lay out, save as PNG and close a matplotlib figure."""
  fig.tight_layout()
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
