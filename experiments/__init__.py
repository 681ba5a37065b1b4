"""metasel's experiments, one module each, with a `get_config(quick)` and a `run(config, out_dir)`.

Installed as the `metasel_experiments` package; run them with `metasel run NAME`.
"""

import importlib
import os
from pathlib import Path

import numpy as np

REGISTRY = {
    "dvn-sine": "metasel_experiments.dvn_sine",
    "dvn-text": "metasel_experiments.dvn_text",
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


def dataset_plan(config) -> dict[str, dict]:
  """Dataset spec -> loader options of an experiment config with `datasets` and per-spec `options`.

  The command line's `dataset`, when set, replaces `datasets` with that one, its options being
  `options[dataset]` updated by `dataset_options`.
  """
  if config.dataset is not None:
    return {config.dataset: {**config.options.get(config.dataset, {}), **config.dataset_options}}
  return {spec: dict(config.options.get(spec, {})) for spec in config.datasets}


def data_file(spec: str) -> str | None:
  """The local file a spec reads ("csv:PATH" or "corrupted:csv:PATH" -> PATH), or None for other data."""
  kind, sep, target = spec.removeprefix("corrupted:").partition(":")
  return target if sep and kind in ("csv", "tsv", "lines") else None


def check_plan(config) -> dict[str, dict]:
  """The checks of a multi-dataset config (as `dataset_plan`) that need no data; returns its plan.

  Seeds, the `dataset_options` override, distinct datasets, the MLP's `hidden` widths, and that every
  local file exists.
  """
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  if config.dataset is None and config.dataset_options:
    raise ValueError(
        f"dataset_options {config.dataset_options!r} apply to `dataset`, which is not set; put per-dataset"
        " options in `options` instead"
    )
  plan = dataset_plan(config)
  if not plan:
    raise ValueError("datasets must name at least one dataset, got none")
  if config.dataset is None and len(set(config.datasets)) != len(config.datasets):
    raise ValueError(f"datasets {config.datasets!r} name a dataset twice; expected distinct specs")
  if not config.hidden or any(not isinstance(w, int) or w < 1 for w in config.hidden):
    raise ValueError(f"hidden must be positive layer widths, got {config.hidden!r}")
  for spec in plan:
    path = data_file(spec)
    if path is not None and not Path(path).expanduser().is_file():
      raise FileNotFoundError(
          f"dataset {spec!r} reads {path}, which does not exist; provide the file or drop {spec!r} from datasets"
      )
  return plan


def interval(values) -> dict[str, float]:
  """Mean and 95% half-width of per-seed values, as a dict; NaN entries are dropped ("n" counts the rest)."""
  from metasel import stats

  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return {"mean": float("nan"), "half_width": float("nan"), "n": 0}
  return stats.mean_ci(values)._asdict()


def ci_text(value: dict[str, float] | None, scale: float = 1.0, signed: bool = False, digits: int = 2) -> str:
  """"mean +- half-width" of an `interval`, times `scale`; "-" for none."""
  if value is None or not value.get("n"):
    return "-"
  sign = "+" if signed else ""
  return f"{scale * value['mean']:{sign}.{digits}f} +- {scale * value['half_width']:.{digits}f}"
