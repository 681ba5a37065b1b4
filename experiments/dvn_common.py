"""What the DVN experiments share: the samplers they compare, one training run, and their summaries."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from metasel import core, data, dvn, models, stats, train
from metasel_experiments import ci_text, interval

SAMPLERS = ("uniform", "grad-norm", "dvn", "dvn-unnormalised", "dvn-no-embedding-norm")
DVN_SAMPLERS = ("dvn", "dvn-unnormalised", "dvn-no-embedding-norm")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The DVN's settings in an experiment: T, K, the contribution's step size eta, and the temperature."""

  period: int = 10
  num_samples: int = 20
  step_size: float = 1e-3
  temperature: float = 1.0


def make_sampler(name: str, model, loss_fn, settings: SamplerSettings) -> core.Method:
  """The sampler `name` of `SAMPLERS` for this model."""
  if name == "uniform":
    return core.uniform()
  if name == "grad-norm":
    return dvn.grad_norm_sampler(model, loss_fn)
  options = dict(
      period=settings.period, num_samples=settings.num_samples, step_size=settings.step_size,
      temperature=settings.temperature, compare_first_order=True, name=name,
  )
  if name == "dvn":
    return dvn.dvn(model, loss_fn, **options)
  if name == "dvn-unnormalised":
    return dvn.dvn(model, loss_fn, normalization="none", **options)
  if name == "dvn-no-embedding-norm":
    features = dvn.proxy_features(model, loss_fn, include=("loss", "grad_norm"))
    return dvn.dvn(model, loss_fn, features=features, **options)
  raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def train_config(config, seed: int) -> train.TrainConfig:
  """An experiment config's training settings (epochs, batch_size, val_batch_size, learning_rate) with Adam.

  The per-sample tracker is off: the DVN experiments read no training dynamics.
  """
  return train.TrainConfig(
      epochs=config.epochs, batch_size=config.batch_size, val_batch_size=config.val_batch_size,
      optimizer="adam", learning_rate=config.learning_rate, seed=seed, track_dynamics=False,
  )


def check_samplers(names, settings: SamplerSettings, dataset: data.Dataset, config: train.TrainConfig) -> None:
  """Raise a clear error for unknown samplers or settings the dataset cannot support, before any compute."""
  unknown = [n for n in names if n not in SAMPLERS]
  if unknown or not names or len(set(names)) != len(names):
    raise ValueError(f"samplers must be distinct names from {SAMPLERS}, got {tuple(names)!r}")
  config.check(dataset)
  model = models.MLP((8,), num_outputs=max(dataset.num_classes, 1))
  for name in names:
    method = make_sampler(name, model, train.loss_fn_for(dataset), settings)
    method.init(jax.random.key(0), len(dataset.train))  # a DVN's init rejects K larger than the pool


class Run(NamedTuple):
  """One training run: its per-epoch history, its DVN probes and the sampler's final pool distribution.

  `probes` holds (step, Spearman of predicted vs true contributions, Spearman of first-order vs true)
  at every meta-update; `pool_ess` the sampler's effective pool size 1 / sum p_i^2 at every step.
  """

  history: list[dict[str, Any]]
  probes: np.ndarray
  pool_ess: np.ndarray
  probs: np.ndarray | None


def train_run(model, dataset: data.Dataset, config: train.TrainConfig, method: core.Method, log) -> Run:
  """Train with `method`, passing each epoch's record to `log` and keeping the DVN's per-step signals."""
  probes, ess = [], []

  def record(entry):
    if "epoch" in entry:
      log(entry)
    elif entry.get("step/dvn/probed") == 1.0:
      probes.append((entry["step"], entry["step/dvn/spearman"], entry["step/dvn/first_order_spearman"]))
    if "step/sampler/pool_ess" in entry:
      ess.append(entry["step/sampler/pool_ess"])

  fit = train.fit(model, dataset, config, method, log=record)
  probs = None if method.probs is None else np.asarray(method.probs(fit.state.method_state))
  return Run(fit.history, np.array(probes, np.float64).reshape(-1, 3), np.array(ess), probs)


def by_epoch(probes: np.ndarray, steps_per_epoch: int, epochs: int, column: int = 1) -> np.ndarray:
  """Mean of a probe column per epoch (epochs,), NaN for an epoch without a finite probe."""
  out = np.full(epochs, np.nan)
  epoch_of = (probes[:, 0].astype(int) - 1) // steps_per_epoch
  for e in range(epochs):
    out[e] = nanmean(probes[epoch_of == e, column])
  return out


def nanmean(values) -> float:
  """Mean of the finite entries; NaN (without a warning) when there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")


def claim(comparison: str, differences, paper: str, scale: float = 1.0) -> dict[str, Any]:
  """A paired per-seed difference, its interval, its verdict, what the paper says, and the display scale."""
  diff = interval(differences)
  return {"comparison": comparison, "difference": diff, "verdict": stats.verdict(diff), "paper": paper, "scale": scale}


def claim_lines(claims: dict[str, dict]) -> list[str]:
  """One line per claim: the comparison, the difference with its 95% interval, the verdict and the paper."""
  width = max(len(c["comparison"]) for c in claims.values()) + 2
  return [
      f"  {name:<44}{c['comparison']:<{width}}{ci_text(c['difference'], c['scale'], True):>18}  {c['verdict']:<26}"
      f" paper: {c['paper']}"
      for name, c in claims.items()
  ]
