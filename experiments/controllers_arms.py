"""The arms of the controllers experiment: each controller built for a run's budget, one training run per unit, and
each run's curve metrics against its paired uniform run."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import optax

from metasel import adapters, checks, controllers, curves, data, records, train
from metasel.controllers import scores as scoring

ARMS = (
    "uniform",
    "curriculum",
    "curriculum-random-order",
    "rescoring-loss",
    "rescoring-entropy",
    "importance-unbiased",
    "importance-biased",
    "weighting-mild",
    "weighting-aggressive",
    "infobatch",
    "random-scores",
)
# The essay's five interventions, and the arms that stand for each.
INTERVENTIONS = {
    "static front-loading": ("curriculum",),
    "dynamic rescoring": ("rescoring-loss",),
    "entropy rescoring": ("rescoring-entropy",),
    "mild gradient weighting": ("weighting-mild", "importance-unbiased"),
    "aggressive gradient weighting": ("weighting-aggressive", "importance-biased"),
}
CONTROLS = {
    "curriculum-random-order": "the curriculum's pacing over a random order",
    "infobatch": "unbiased soft pruning (InfoBatch)",
    "random-scores": "negative control: must come out equivalent to uniform",
}
# Arms and the control that has their machinery without their information: the signal's own effect.
MACHINERY_CONTROLS = {
    "curriculum": "curriculum-random-order",
    "rescoring-loss": "random-scores",
    "rescoring-entropy": "random-scores",
}
PRESAMPLED = ("importance-unbiased", "importance-biased")
METRICS = ("accuracy", "aulc", "steps")


@dataclasses.dataclass(frozen=True)
class Scale:
  """A classifier scale: the model, its hidden widths (the transformer's width and depth) and its peak learning rate."""

  name: str
  model: str
  hidden: tuple[int, ...]
  learning_rate: float = 2e-3


@dataclasses.dataclass(frozen=True)
class ArmSettings:
  """The controllers' settings, fixed before the run.

  `ramp_share` is T_ramp as a share of the budget; `pilot_passes` the uniform pilot's passes, after which
  every sample's `pilot_signal` (one of `controllers.scores.POOL_SIGNALS`, at the pilot's final params)
  sorts the curriculum, easy (low) first; `presample` is
  B / b of importance sampling; `biased_exponent` its k < 1; `mild_alpha` / `aggressive_alpha` the
  loss-weighting exponents.
  """

  curriculum_start: float = 0.2
  ramp_share: float = 0.5
  pilot_passes: int = 1
  pilot_signal: str = "loss"
  pressure: tuple[float, float] = (100.0, 1.0)
  presample: int = 3
  biased_exponent: float = 0.5
  mild_alpha: float = 0.5
  aggressive_alpha: float = 2.0
  infobatch_ratio: float = 0.5


@dataclasses.dataclass(frozen=True)
class Budget:
  """A run's step budget: total optimiser steps, steps per pass over the pool (N // b) and between evaluations."""

  total_steps: int
  pass_steps: int
  eval_every: int

  @property
  def evaluations(self) -> int:
    return self.total_steps // self.eval_every


def budget(num_train: int, batch_size: int, passes: int, evaluations: int) -> Budget:
  """`passes` over a pool of `num_train` at `batch_size`, evaluated `evaluations` times at equal spacing."""
  pass_steps = num_train // batch_size
  if passes * pass_steps < evaluations:
    raise ValueError(
        f"{passes} passes of {pass_steps} steps (N={num_train}, batch {batch_size}) cannot hold {evaluations}"
        " evaluations; expected at least one step between evaluations"
    )
  eval_every = passes * pass_steps // evaluations
  return Budget(eval_every * evaluations, pass_steps, eval_every)


def check_arms(arms, settings: ArmSettings) -> None:
  """Unknown or repeated arms, a missing uniform reference, or bad controller settings: clear errors before compute."""
  unknown = [a for a in arms if a not in ARMS]
  if unknown or len(set(arms)) != len(arms) or "uniform" not in arms:
    raise ValueError(f"arms must be distinct names from {ARMS}, uniform among them (the reference); got {tuple(arms)!r}")
  if settings.pilot_signal not in scoring.POOL_SIGNALS:
    raise ValueError(f"pilot_signal {settings.pilot_signal!r} is not a signal of one forward pass; expected one of {scoring.POOL_SIGNALS}")
  checks.check_int("presample", settings.presample)
  checks.check_int("pilot_passes", settings.pilot_passes)
  if not 0 < settings.ramp_share <= 1:
    raise ValueError(f"ramp_share must lie in (0, 1], got {settings.ramp_share!r}")
  example = Budget(100, 10, 10)
  pilot = np.zeros(4)
  for arm in ARMS:  # every controller checks its own settings when built, used here or not
    make_arm(arm, settings, example, 8, pilot)


def make_arm(name: str, settings: ArmSettings, plan: Budget, batch_size: int, pilot_scores) -> Any:
  """The method of arm `name` for a run of `plan`; `pilot_scores` (N,) sort the curriculum."""
  ramp = max(int(settings.ramp_share * plan.total_steps), 1)
  rescore = dict(total_steps=plan.total_steps, pressure=settings.pressure)
  build = {
      "uniform": lambda: None,
      "curriculum": lambda: controllers.curriculum(pilot_scores, ramp_steps=ramp, start=settings.curriculum_start),
      "curriculum-random-order": lambda: controllers.random_order_curriculum(ramp_steps=ramp, start=settings.curriculum_start),
      "rescoring-loss": lambda: controllers.rescoring("loss", **rescore),
      "rescoring-entropy": lambda: controllers.entropy_rescoring("entropy", **rescore),
      "importance-unbiased": lambda: controllers.importance_sampling(batch_size, exponent=1.0),
      "importance-biased": lambda: controllers.importance_sampling(batch_size, exponent=settings.biased_exponent),
      "weighting-mild": lambda: controllers.loss_weighting(settings.mild_alpha),
      "weighting-aggressive": lambda: controllers.loss_weighting(settings.aggressive_alpha),
      "infobatch": lambda: controllers.infobatch(
          total_steps=plan.total_steps, pass_steps=plan.pass_steps, ratio=settings.infobatch_ratio
      ),
      "random-scores": lambda: controllers.random_scores(**rescore),
  }
  return build[name]()


@records.valued
def schedule_optimizer(learning_rate: float, total_steps: int) -> optax.GradientTransformation:
  """Adam on a cosine schedule decayed to zero over the budget: a record equal for equal (rate, budget), so every
  arm and seed of a scale shares its compiled epoch."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, total_steps))


def train_config(arm: str, settings: ArmSettings, plan: Budget, batch_size: int, scale: Scale, seed: int) -> train.TrainConfig:
  """The arm's training settings: the shared schedule and evaluation points; a presample of B = presample x b for
  importance sampling."""
  size = batch_size * settings.presample if arm in PRESAMPLED else batch_size
  return train.TrainConfig(
      epochs=plan.evaluations, batch_size=size, val_batch_size=min(batch_size, 32),
      optimizer=schedule_optimizer(scale.learning_rate, plan.total_steps), seed=seed, track_dynamics=False,
      steps_per_epoch=plan.eval_every,
  )


def pilot_scores(model, dataset: data.Dataset, settings: ArmSettings, batch_size: int, scale: Scale, seed: int) -> np.ndarray:
  """The curriculum's scores (N,): every training sample's `pilot_signal` at the end of a short uniform pilot run of
  `pilot_passes` passes (its own init and order), by one forward pass over the pool."""
  config = train.TrainConfig(
      epochs=settings.pilot_passes, batch_size=batch_size, val_batch_size=min(batch_size, 32),
      learning_rate=scale.learning_rate, seed=seed + 10_000, track_dynamics=False,
  )
  params = train.fit(model, dataset, config).state.params
  x, y = np.asarray(dataset.train.x), np.asarray(dataset.train.y)
  values = scoring.pool_signal(model, params, x, y, settings.pilot_signal, train.loss_fn_for(dataset))
  return np.asarray(values, np.float64)


def run_arm(method, model: adapters.ModelLike, dataset: data.Dataset, config: train.TrainConfig, log) -> dict[str, Any]:
  """One training run: its evaluation steps, validation and test accuracy curves, wall time, and the share of steps
  importance sampling was on (NaN for other arms)."""
  start = time.perf_counter()
  result = train.fit(model, dataset, config, method, log=lambda r: "epoch" in r and log(r), log_every=10**9)
  active = [r["train/importance/active"] for r in result.history if "train/importance/active" in r]
  return {
      "importance_active": float(np.mean(active)) if active else float("nan"),
      "seed": config.seed,
      "steps": [r["step"] for r in result.history],
      "val_accuracy": [r["val/accuracy"] for r in result.history],
      "test_accuracy": [r["test/accuracy"] for r in result.history],
      "seconds": time.perf_counter() - start,
  }


def run_metrics(run: dict[str, Any], reference: dict[str, Any], level: float = 0.95) -> dict[str, float]:
  """A run's final validation accuracy (mean of the last 3 evaluations), normalised AULC, final test accuracy, and the
  steps to `level` x its paired uniform run's final validation accuracy (censored: the budget, flagged)."""
  target = level * curves.final_value(reference["val_accuracy"])
  steps, reached = curves.steps_to(run["steps"], run["val_accuracy"], target)
  return {
      "accuracy": curves.final_value(run["val_accuracy"]),
      "aulc": curves.normalised_area(run["steps"], run["val_accuracy"]),
      "test_accuracy": curves.final_value(run["test_accuracy"]),
      "steps": steps,
      "censored": not reached,
  }


def differences(arm_metrics: list[dict], uniform_metrics: list[dict]) -> dict[str, np.ndarray]:
  """Paired per-seed differences, positive when the arm is better: accuracy and AULC (arm - uniform), and
  log(steps_uniform / steps_arm) for the steps to 95%."""
  def column(rows, key):
    return np.array([r[key] for r in rows], np.float64)

  return {
      "accuracy": column(arm_metrics, "accuracy") - column(uniform_metrics, "accuracy"),
      "aulc": column(arm_metrics, "aulc") - column(uniform_metrics, "aulc"),
      "steps": np.log(column(uniform_metrics, "steps")) - np.log(column(arm_metrics, "steps")),
  }
