"""metasel's experiments, one module each, with a `get_config(quick)` and a `run(config, out_dir)`.

Installed as the `metasel_experiments` package; run them with `metasel run NAME`.
"""

import importlib
import os
from pathlib import Path

import numpy as np

REGISTRY = {
    "controllers": "metasel_experiments.controllers",
    "dvn-sine": "metasel_experiments.dvn_sine",
    "dvn-text": "metasel_experiments.dvn_text",
    "forecast-corpus": "metasel_experiments.forecast_corpus",
    "gsnr-sweep": "metasel_experiments.gsnr_sweep",
    "influence-selection": "metasel_experiments.influence_selection",
    "influence-fidelity": "metasel_experiments.influence_fidelity",
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


MODELS = ("mlp", "cnn", "transformer")


def is_text(spec: str) -> bool:
  """Whether a dataset spec reads text (csv:, tsv:, lines:, tfds:, or a corrupted: mixture of one)."""
  return spec.removeprefix("corrupted:").partition(":")[0] in ("csv", "tsv", "lines", "tfds")


def with_representation(spec: str, options: dict, model: str) -> dict:
  """Loader options for `model`: text read as token ids for the transformer (unless the options say otherwise)."""
  if model == "transformer" and is_text(spec):
    return {"representation": "tokens", **options}
  return dict(options)


def dataset_plan(config) -> dict[str, dict]:
  """Dataset spec -> loader options of an experiment config with `datasets` and per-spec `options`.

  The command line's `dataset`, when set, replaces `datasets` with that one, its options being
  `options[dataset]` updated by `dataset_options`. With the transformer, text is read as token ids.
  """
  model = getattr(config, "model", "mlp")
  if config.dataset is not None:
    options = {**config.options.get(config.dataset, {}), **config.dataset_options}
    return {config.dataset: with_representation(config.dataset, options, model)}
  return {spec: with_representation(spec, config.options.get(spec, {}), model) for spec in config.datasets}


def check_model(name: str, dataset) -> None:
  """Raise a clear error when the model `name` of `MODELS` cannot take the dataset's samples."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
  if name == "cnn" and len(dataset.input_shape) != 3:
    raise ValueError(
        f"model 'cnn' needs images of shape (height, width, channels), but {dataset.name!r} has samples of"
        f" shape {dataset.input_shape}; use model 'mlp'"
    )
  if name == "transformer" and not dataset.is_tokens:
    raise ValueError(
        f"model 'transformer' needs text read as token ids, but {dataset.name!r} is not text"
        " (expected a csv:, tsv:, lines: or tfds: text dataset); use model 'mlp'"
    )
  if name != "transformer" and dataset.is_tokens:
    raise ValueError(f"{dataset.name!r} was read as token ids, which only model 'transformer' takes")


def make_model(name: str, dataset, hidden: tuple[int, ...], options: dict | None = None):
  """The model `name` of `MODELS` for a dataset, built from plain Flax layers.

  `hidden` gives the MLP's hidden widths, the CNN's dense widths, and the transformer's width (its
  first entry) and depth (the number of entries), with 4 heads when the width allows. The transformer's
  token table has the loader's `vocab_size` (from `options`) rows, the most any seed's vocabulary holds,
  so that one model (and its compiled programs) serves every seed.
  """
  from metasel import models
  from metasel.data import text

  check_model(name, dataset)
  outputs = max(dataset.num_classes, 1)
  if name == "mlp":
    return models.MLP(tuple(hidden), num_outputs=outputs)
  if name == "cnn":
    return models.CNN(hidden=tuple(hidden), num_outputs=outputs)
  width = hidden[0]
  vocab_size = max((options or {}).get("vocab_size", text.DEFAULT_VOCAB_SIZE), len(dataset.vocabulary))
  return models.Transformer(
      vocab_size=vocab_size, num_outputs=outputs, max_length=dataset.input_shape[0], width=width,
      depth=len(hidden), heads=4 if width % 4 == 0 else 1,
  )


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
  if getattr(config, "model", "mlp") not in MODELS:
    raise ValueError(f"unknown model {config.model!r}; expected one of {MODELS}")
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
