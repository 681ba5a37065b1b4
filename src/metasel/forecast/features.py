"""Features of a learning curve cut at epoch t0: its level, slopes and curvature, the generalisation gap,
Prechelt's early-stopping criteria, a fitted pow3 curve, and the run-level per-sample signal summaries."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.optimize

from metasel import checks
from metasel.forecast import targets as targets_lib
from metasel.signals import SUMMARY_NAMES

__all__ = ["CURVE_COLUMNS", "SAMPLE_COLUMNS", "CURVE_FEATURES", "SAMPLE_FEATURES", "pow3", "fit_pow3",
           "prechelt", "curve_features", "sample_features"]

CURVE_COLUMNS = ("val/accuracy", "val/loss", "train/mean_loss")
SAMPLE_COLUMNS = tuple(f"signals/{name}" for name in SUMMARY_NAMES)
PROGRESS_STRIP = 5  # Prechelt's training strip k, also the window of the slopes
CURVE_FEATURES = (
    "epoch", "accuracy", "accuracy_last", "below_best", "accuracy_slope_3", "accuracy_slope_5",
    "accuracy_curvature", "val_loss", "train_loss", "val_loss_slope_5", "train_loss_slope_5",
    "generalisation_gap", "gl", "pq", "pow3_c", "pow3_a", "pow3_alpha", "pow3_final_change", "pow3_gain",
)
SAMPLE_FEATURES = tuple(f"{column}{suffix}" for column in SAMPLE_COLUMNS for suffix in ("", "/change"))
POW3_BOUNDS = ([0.0, -1.0, 0.01], [1.5, 2.0, 5.0])  # c, a, alpha


def pow3(epoch, c: float, a: float, alpha: float):
  """The pow3 learning curve c - a * epoch^(-alpha) (Domhan et al., 2015): it tends to c."""
  return c - a * np.power(np.asarray(epoch, np.float64), -alpha)


def fit_pow3(epochs, accuracy) -> tuple[float, float, float]:
  """Least-squares pow3 parameters (c, a, alpha) of a curve, within `POW3_BOUNDS`.

  A curve the fit cannot follow (too short, or the optimiser fails) gets a flat curve at its last
  level, (level, 0, 1), so that forecasting never stops on it.
  """
  epochs, accuracy = np.asarray(epochs, np.float64), np.asarray(accuracy, np.float64)
  flat = (float(accuracy[-targets_lib.LEVEL_WINDOW:].mean()), 0.0, 1.0)
  if accuracy.size < 3:
    return flat
  start = (float(np.clip(accuracy[-1], 0.0, 1.5)), float(np.clip(accuracy[-1] - accuracy[0], -1.0, 2.0)), 0.5)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)
      params, _ = scipy.optimize.curve_fit(pow3, epochs, accuracy, p0=start, bounds=POW3_BOUNDS, maxfev=5000)
  except (RuntimeError, ValueError):
    return flat
  return tuple(float(p) for p in params)


def _slope(values: np.ndarray, window: int) -> float:
  """Least-squares slope per epoch over the last `window` values (fewer when the curve is shorter; 0 for one)."""
  tail = values[-window:]
  return 0.0 if tail.size < 2 else float(np.polyfit(np.arange(tail.size), tail, 1)[0])


def _curvature(values: np.ndarray, window: int) -> float:
  """Second derivative of a quadratic fitted to the last `window` values (0 with fewer than 3)."""
  tail = values[-window:]
  return 0.0 if tail.size < 3 else float(2.0 * np.polyfit(np.arange(tail.size), tail, 2)[0])


def prechelt(val_loss, train_loss, strip: int = PROGRESS_STRIP) -> tuple[float, float]:
  """Prechelt's (1998) generalisation loss GL and quotient PQ = GL / P_k at the curve's last epoch.

  GL = 100 (E_va / min E_va so far - 1); P_k = 1000 (mean E_tr of the last k epochs / their min - 1),
  floored at 0.1 so that PQ stays finite once training has converged.
  """
  val_loss, train_loss = np.asarray(val_loss, np.float64), np.asarray(train_loss, np.float64)
  gl = 100.0 * (val_loss[-1] / max(val_loss.min(), 1e-12) - 1.0)
  tail = train_loss[-strip:]
  progress = 1000.0 * (tail.mean() / max(tail.min(), 1e-12) - 1.0)
  return float(gl), float(gl / max(progress, 0.1))


def curve_features(curve: dict[str, np.ndarray], cutoff: int, budget: int, horizon: int) -> dict[str, float]:
  """`CURVE_FEATURES` of the first `cutoff` epochs of a curve (`CURVE_COLUMNS` arrays of one value per epoch).

  The pow3 fit's extrapolations to the budget and to cutoff + horizon are features as well as the
  power-law baseline's forecasts.
  """
  checks.check_int("cutoff", cutoff)
  accuracy, val_loss, train_loss = (np.asarray(curve[c], np.float64)[:cutoff] for c in CURVE_COLUMNS)
  if accuracy.size < cutoff:
    raise ValueError(f"the curve has {accuracy.size} epochs, fewer than the cutoff {cutoff}")
  now = targets_lib.level(accuracy, cutoff)
  epochs = np.arange(1, cutoff + 1)
  c, a, alpha = fit_pow3(epochs, accuracy)
  gl, pq = prechelt(val_loss, train_loss)
  window = targets_lib.LEVEL_WINDOW
  return {
      "epoch": float(cutoff),
      "accuracy": now,
      "accuracy_last": float(accuracy[-1]),
      "below_best": float(accuracy.max() - now),
      "accuracy_slope_3": _slope(accuracy, 3),
      "accuracy_slope_5": _slope(accuracy, PROGRESS_STRIP),
      "accuracy_curvature": _curvature(accuracy, PROGRESS_STRIP),
      "val_loss": float(val_loss[-window:].mean()),
      "train_loss": float(train_loss[-window:].mean()),
      "val_loss_slope_5": _slope(val_loss, PROGRESS_STRIP),
      "train_loss_slope_5": _slope(train_loss, PROGRESS_STRIP),
      "generalisation_gap": float(val_loss[-window:].mean() - train_loss[-window:].mean()),
      "gl": gl,
      "pq": pq,
      "pow3_c": c,
      "pow3_a": a,
      "pow3_alpha": alpha,
      "pow3_final_change": float(pow3(budget, c, a, alpha) - now),
      "pow3_gain": float(pow3(cutoff + horizon, c, a, alpha) - pow3(cutoff, c, a, alpha)),
  }


def sample_features(curve: dict[str, np.ndarray], cutoff: int) -> dict[str, float]:
  """`SAMPLE_FEATURES`: each per-sample summary at the cutoff and its change over the last `LEVEL_WINDOW` epochs."""
  result = {}
  back = max(cutoff - targets_lib.LEVEL_WINDOW, 1)
  for column in SAMPLE_COLUMNS:
    values = np.asarray(curve[column], np.float64)
    result[column] = float(values[cutoff - 1])
    result[f"{column}/change"] = float(values[cutoff - 1] - values[back - 1])
  return result
