"""What a forecast predicts about a run's validation-accuracy curve, computed from the whole curve: the final
accuracy, the epoch it plateaus (censored at the budget) and the gain of `horizon` more epochs."""

from __future__ import annotations

import numpy as np

from metasel import checks, curves

__all__ = ["LEVEL_WINDOW", "PLATEAU_TOLERANCE", "PLATEAU_PATIENCE", "HELPS_MARGIN", "level", "final_accuracy",
           "gain", "plateau_epoch", "targets"]

LEVEL_WINDOW = 3  # evaluations averaged into the level at an epoch (and into the final accuracy)
PLATEAU_TOLERANCE = 0.005  # a plateau gains no more than half a point afterwards
PLATEAU_PATIENCE = 5  # epochs of evidence needed after a plateau; a later one is censored at the budget
HELPS_MARGIN = 0.005  # "more epochs help" means a gain above half a point


def _accuracy(accuracy) -> np.ndarray:
  accuracy = np.asarray(accuracy, np.float64)
  if accuracy.ndim != 1 or accuracy.size == 0:
    raise ValueError(f"a validation-accuracy curve needs one value per epoch, got shape {accuracy.shape}")
  checks.check_finite_rows("validation accuracy", accuracy)
  return accuracy


def level(accuracy, epoch: int) -> float:
  """The accuracy at `epoch` (1-based), smoothed: the mean of the evaluations up to it, at most `LEVEL_WINDOW`."""
  accuracy = _accuracy(accuracy)
  checks.check_int("epoch", epoch, maximum=accuracy.size)
  return float(accuracy[max(0, epoch - LEVEL_WINDOW):epoch].mean())


def final_accuracy(accuracy) -> float:
  """The run's final accuracy: the mean of its last `LEVEL_WINDOW` evaluations."""
  return curves.final_value(_accuracy(accuracy), LEVEL_WINDOW)


def gain(accuracy, epoch: int, horizon: int) -> float:
  """How much `horizon` more epochs raise the level: level(epoch + horizon) - level(epoch)."""
  return level(accuracy, epoch + horizon) - level(accuracy, epoch)


def plateau_epoch(accuracy, tolerance: float = PLATEAU_TOLERANCE, patience: int = PLATEAU_PATIENCE) -> tuple[int, bool]:
  """The first epoch after which the level never rises more than `tolerance` above its value there, and
  whether that is observed.

  A plateau in the last `patience` epochs has too little evidence behind it: it is censored, returned
  as the budget (the curve's length) with False, meaning "at the budget or later".
  """
  accuracy = _accuracy(accuracy)
  checks.check_int("patience", patience, minimum=0)
  levels = np.array([level(accuracy, t) for t in range(1, accuracy.size + 1)])
  best_ahead = np.maximum.accumulate(levels[::-1])[::-1]  # max over [t, budget]
  first = int(np.flatnonzero(best_ahead <= levels + tolerance)[0]) + 1
  if accuracy.size - first < patience:
    return accuracy.size, False
  return first, True


def targets(accuracy, cutoff: int, horizon: int) -> dict[str, float]:
  """Every target of a forecast made at epoch `cutoff` of a finished run (the curve's length is the budget).

  "final" (final accuracy), "final_change" (final minus the level at the cutoff, what the models learn),
  "gain" and "helps" (gain above `HELPS_MARGIN`), "plateau" and "plateau_observed".
  """
  accuracy = _accuracy(accuracy)
  checks.check_int("horizon", horizon)
  if cutoff + horizon > accuracy.size:
    raise ValueError(
        f"a run of {accuracy.size} epochs cannot give targets at cutoff {cutoff} with horizon {horizon};"
        f" expected cutoff + horizon <= {accuracy.size}"
    )
  now = level(accuracy, cutoff)
  final = final_accuracy(accuracy)
  epoch_gain = gain(accuracy, cutoff, horizon)
  plateau, observed = plateau_epoch(accuracy)
  return {"final": final, "final_change": final - now, "gain": epoch_gain, "helps": float(epoch_gain > HELPS_MARGIN),
          "plateau": float(plateau), "plateau_observed": float(observed)}
