"""The controllers experiment: verdicts and conclusions from planted differences, and bad settings refused up front."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import metasel_experiments
from metasel_experiments import controllers_arms, controllers_report
from metasel_experiments.controllers_arms import ArmSettings

MODULE = metasel_experiments.get("controllers")
MARGINS = MODULE.MARGINS


def _run(final: float, seed: int, shift: float = 0.0) -> dict:
  """A hand-made run: accuracy rising linearly to `final` + shift over 4 evaluations."""
  level = final + shift
  return {
      "seed": seed, "steps": [10, 20, 30, 40], "val_accuracy": list(np.linspace(0.4, level, 4)),
      "test_accuracy": list(np.linspace(0.4, level, 4)), "seconds": 1.0, "importance_active": float("nan"),
  }


def _cells(shifts: dict[str, np.ndarray]) -> dict:
  rng = np.random.default_rng(0)
  finals = 0.8 + 0.02 * rng.standard_normal(12)
  runs_by_arm = {"uniform": [_run(f, s) for s, f in enumerate(finals)]}
  for arm, shift in shifts.items():
    runs_by_arm[arm] = [_run(f, s, d) for s, (f, d) in enumerate(zip(finals, shift))]
  cell = {"dataset": "mixture", "scale": "mlp", "arms": MODULE.cell_results(runs_by_arm, MARGINS, 5)}
  return controllers_report.with_verdicts({"mixture/mlp": cell}, 0.05)


def test_planted_gain_equivalence_and_loss_get_their_verdicts_and_the_claim_follows():
  rng = np.random.default_rng(1)
  cells = _cells({
      "curriculum": 0.15 + 0.002 * rng.standard_normal(12),  # +15 points
      "rescoring-loss": 0.0005 * rng.standard_normal(12),  # inside the margin
      "weighting-aggressive": -0.05 + 0.002 * rng.standard_normal(12),  # -5 points
      "random-scores": np.tile([0.05, -0.05], 6),  # no mean difference, too spread to show equivalence
  })
  arms = cells["mixture/mlp"]["arms"]
  assert arms["curriculum"]["verdict"]["accuracy"] == "beats uniform"
  assert arms["rescoring-loss"]["verdict"]["accuracy"] == "equivalent to uniform"
  assert arms["weighting-aggressive"]["verdict"]["accuracy"] == "worse"
  assert arms["random-scores"]["verdict"]["accuracy"] == "inconclusive"
  assert arms["curriculum"]["verdict"]["steps"] == "beats uniform"  # reaches 95% of uniform's level sooner
  # Holm: every adjusted p is at least the raw one.
  for entry in arms.values():
    if "p_superior" in entry:
      assert all(entry["p_superior_holm"][m] >= entry["p_superior"][m] - 1e-12 for m in controllers_arms.METRICS)
  conclusions = controllers_report.conclusions({"cells": cells})
  assert conclusions["interventions"]["static front-loading"]["claim"] == "fails"
  assert conclusions["interventions"]["dynamic rescoring"]["claim"] == "holds"
  assert conclusions["interventions"]["aggressive gradient weighting"]["claim"] == "holds"
  assert not conclusions["negative_control"]["equivalent_everywhere"]
  assert arms["rescoring-loss"]["pilot_seeds_needed"]["accuracy"] <= 5 < arms["random-scores"]["pilot_seeds_needed"]["accuracy"]


def test_runs_that_never_reach_the_level_are_censored_at_the_budget():
  uniform, slow = _run(0.8, 0), _run(0.8, 0, -0.4)
  metrics = controllers_arms.run_metrics(slow, uniform)
  assert metrics["censored"] and metrics["steps"] == 40
  assert not controllers_arms.run_metrics(uniform, uniform)["censored"]


def test_budget_and_presampled_arms_share_the_evaluation_steps():
  plan = controllers_arms.budget(2000, 32, 6, 12)
  assert (plan.total_steps, plan.pass_steps, plan.eval_every) == (372, 62, 31)
  scale = controllers_arms.Scale("mlp", "mlp", (8,))
  plain = controllers_arms.train_config("uniform", ArmSettings(), plan, 32, scale, 3)
  presampled = controllers_arms.train_config("importance-unbiased", ArmSettings(), plan, 32, scale, 3)
  assert presampled.batch_size == 3 * plain.batch_size == 96
  assert presampled.steps_per_epoch == plain.steps_per_epoch == 31 and plain.epochs == 12
  assert presampled.optimizer == plain.optimizer and hash(presampled.optimizer) == hash(plain.optimizer)  # one compiled epoch per arm and scale


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": ("curriculum", "rescoring-loss")}, "uniform among them"),
        ({"arms": ("uniform", "magic")}, "arms must be distinct names"),
        ({"arm_settings": ArmSettings(curriculum_start=0.0)}, "pacing start"),
        ({"arm_settings": ArmSettings(pressure=(0.5, 1.0))}, "selection pressure"),
        ({"arm_settings": ArmSettings(mild_alpha=-1.0)}, "alpha must be a number in"),
        ({"arm_settings": ArmSettings(biased_exponent=-0.5)}, "exponent must be a number in"),
        ({"arm_settings": ArmSettings(pilot_signal="lossy")}, "pilot_signal"),
        ({"seeds": (0,)}, "at least 2 distinct seeds"),
        ({"pilot_seeds": 9}, "pilot_seeds"),
        ({"margins": {"accuracy": 0.005}}, "margins"),
        ({"model": "cnn"}, "no scale has model"),
        ({"batch_size": 500}, "training samples"),
    ],
)
def test_bad_settings_are_refused_before_compute(change, message):
  config = dataclasses.replace(MODULE.get_config(quick=True), **change)
  with pytest.raises(ValueError, match=message):
    MODULE.check(config)
