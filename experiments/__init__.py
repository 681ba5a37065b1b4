"""metasel's experiments, one module each, with a `get_config(quick)` and a `run(config, out_dir)`.

Installed as the `metasel_experiments` package; run them with `metasel run NAME`.
"""

import importlib
import os
from pathlib import Path

import numpy as np

REGISTRY = {
    "gsnr-sweep": "metasel_experiments.gsnr_sweep",
    "mts-benchmark": "metasel_experiments.mts_benchmark",
    "signals-report": "metasel_experiments.signals_report",
}


def get(name: str):
  """The experiment module registered as `name` (e.g. "signals-report")."""
  if name not in REGISTRY:
    raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(REGISTRY)}")
  return importlib.import_module(REGISTRY[name])


def shared_data(relative: str) -> Path:
  """A file of the shared real-text folder: $METASEL_SHARED_DATA, else ../shared/data beside the repository.

  The project ships no real data; experiments and tests read such files by path.
  """
  env = os.environ.get("METASEL_SHARED_DATA")
  root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
  return root / relative


def load_checked(experiment: str, spec: str, options: dict, seed: int, *, needs_tiers: bool = False):
  """Load `spec` for an experiment's `check`: it must be classification, with corrupt tiers if `needs_tiers`."""
  from metasel import data

  dataset = data.load(spec, seed=seed, **options)
  if dataset.task != "classification":
    raise ValueError(f"{experiment} needs a classification dataset, got regression data {spec!r}")
  if needs_tiers and np.all(dataset.train.tier == data.CLEAN_TIER):
    raise ValueError(
        f"{experiment} scores against known corruption, but {spec!r} has only clean training samples;"
        " expected a dataset with quality tiers such as mixture, digits-synthetic or corrupted:SPEC"
    )
  return dataset
