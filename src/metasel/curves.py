"""Summaries of a learning curve (a metric evaluated at increasing steps): its final level, its normalised area, and
the steps it takes to reach a level (censored when it never does)."""

from __future__ import annotations

import numpy as np

from metasel import checks

__all__ = ["check_curve", "final_value", "normalised_area", "steps_to"]


def check_curve(steps, values) -> tuple[np.ndarray, np.ndarray]:
  """The curve as float arrays; a clear error for mismatched lengths, steps that do not increase, or non-finite values."""
  steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  if steps.ndim != 1 or steps.shape != values.shape or steps.size == 0:
    raise ValueError(f"a curve needs one value per evaluation step; got steps of shape {steps.shape} and values of shape {values.shape}")
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f"curve steps must increase strictly, got {steps.tolist()}")
  checks.check_finite_rows("curve values", values)
  return steps, values


def final_value(values, last: int = 3) -> float:
  """The mean of the last `last` evaluations (fewer when the curve is shorter): a final level less noisy than one point."""
  checks.check_int("last", last)
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("final_value needs at least one evaluation, got an empty curve")
  return float(values[-last:].mean())


def normalised_area(steps, values) -> float:
  """Trapezoid area under the curve divided by its step span: the curve's mean level, in [0, 1] for accuracies.

  One evaluation gives that value.
  """
  steps, values = check_curve(steps, values)
  if steps.size == 1:
    return float(values[0])
  return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def steps_to(steps, values, level: float) -> tuple[float, bool]:
  """The first step at which the curve reaches `level`, interpolated linearly between evaluations, and whether it did.

  A curve that never reaches it returns its last step and False (censored: the true count is larger); one
  that starts above it returns its first step.
  """
  steps, values = check_curve(steps, values)
  above = np.flatnonzero(values >= level)
  if above.size == 0:
    return float(steps[-1]), False
  i = int(above[0])
  if i == 0:
    return float(steps[0]), True
  fraction = (level - values[i - 1]) / (values[i] - values[i - 1])
  return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1])), True
