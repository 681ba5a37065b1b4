"""What the influence experiments share: the settings (dataset and model), label noise, and the scorers compared."""

from __future__ import annotations

from typing import NamedTuple

from metasel import data, influence, persample
from metasel_experiments import make_model, shared_data

AG_NEWS = f"csv:{shared_data('ag_news/test.csv')}"


class Setting(NamedTuple):
  """A dataset spec with its loader options and the model trained on it."""

  spec: str
  model: str
  options: dict


SETTINGS = {
    "mixture": Setting("mixture", "mlp", {"tiers": {}, "n_real": 1000, "n_synthetic": 0, "n_val": 200, "n_test": 1000}),
    "digits": Setting("digits-synthetic", "mlp", {"tiers": {}, "n_real": 1000, "n_synthetic": 0, "n_val": 200, "n_test": 400, "flatten": True}),
    "agnews-mlp": Setting(AG_NEWS, "mlp", {"n_train": 1000, "n_val": 200, "n_test": 400, "max_features": 2000}),
    "agnews-transformer": Setting(
        AG_NEWS, "transformer",
        {"n_train": 1000, "n_val": 200, "n_test": 400, "representation": "tokens", "max_length": 48, "vocab_size": 5000},
    ),
}
NOISE_KINDS = data.synthetic.LABEL_NOISE_KINDS


def check_settings(names, noise_kind: str) -> None:
  """Raise a clear error for unknown setting names or noise kinds, before any compute."""
  unknown = [name for name in names if name not in SETTINGS]
  if unknown or not names:
    raise ValueError(f"unknown settings {unknown or list(names)}; expected some of {list(SETTINGS)}")
  if noise_kind not in NOISE_KINDS:
    raise ValueError(f"unknown noise kind {noise_kind!r}; expected one of {NOISE_KINDS}")


def condition_name(kind: str, level: float) -> str:
  """A noise condition's name: "clean", or e.g. "cyclic 40%"."""
  return "clean" if level == 0 else f"{kind} {level:.0%}"


def hidden_for(config, setting: str) -> tuple[int, ...]:
  """The model widths of a setting in an experiment config: its `transformer_hidden` for the transformer,
  its `mlp_hidden` for the MLPs."""
  return config.transformer_hidden if SETTINGS[setting].model == "transformer" else config.mlp_hidden


def load(setting: Setting, seed: int, *, noise: float, kind: str, overrides: dict | None = None) -> data.Dataset:
  """The setting's clean dataset for `seed` with `noise` of its training labels flipped (`kind` as in label_noise).

  Cyclic noise shifts a flipped label by one class, y -> (y + 1) mod C.
  """
  clean = data.load(setting.spec, seed=seed, **{**setting.options, **(overrides or {})})
  return data.synthetic.label_noise(clean, noise, seed=seed, kind=kind, offset=1)


def model_for(setting: Setting, dataset: data.Dataset, hidden: tuple[int, ...], overrides: dict | None = None):
  """The setting's model (an MLP of `hidden`, or a transformer of width hidden[0] and depth len(hidden))."""
  return make_model(setting.model, dataset, hidden, {**setting.options, **(overrides or {})})


def scorers(model, loss_fn: persample.LossFn) -> dict[str, influence.Scorer]:
  """The scorers compared: exact ghost influence, LAI on all dense layers, on the last, and its "means" form."""
  return {
      "ghost": influence.ghost_scorer(model, loss_fn),
      "lai": influence.lai_scorer(model, loss_fn),
      "lai-last": influence.lai_scorer(model, loss_fn, layers="last"),
      "lai-means": influence.lai_scorer(model, loss_fn, form="means"),
  }
