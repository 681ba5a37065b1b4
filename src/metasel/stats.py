"""Summaries across seeds: mean with a Student-t confidence interval, its verdict, an equivalence test, and AUC."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.weightstats import DescrStatsW

from metasel import checks

__all__ = ["Interval", "mean_ci", "verdict", "tost", "auc"]


class Interval(NamedTuple):
  """Mean of `n` values with the half-width of its confidence interval (mean +- half_width)."""

  mean: float
  half_width: float
  n: int

  def __str__(self) -> str:
    return f"{self.mean:.4f} +- {self.half_width:.4f} (n={self.n})"


def mean_ci(values, level: float = 0.95) -> Interval:
  """Mean and Student-t confidence interval of independent values (e.g. one per seed).

  With a single value the half-width is NaN: one seed says nothing about spread.
  """
  values = np.asarray(values, dtype=np.float64).ravel()
  if values.size == 0:
    raise ValueError("mean_ci needs at least one value, got none")
  if not 0 < level < 1:
    raise ValueError(f"level must lie in (0, 1), got {level!r}")
  n = values.size
  if n == 1:
    return Interval(float(values[0]), float("nan"), 1)
  sem = values.std(ddof=1) / np.sqrt(n)
  return Interval(float(values.mean()), float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * sem), n)


def verdict(interval: Interval | dict) -> str:
  """"holds" / "does not hold" when the interval of a difference lies above / below 0, else no difference.

  The third verdict reads "no significant difference".
  """
  mean, half = (interval["mean"], interval["half_width"]) if isinstance(interval, dict) else interval[:2]
  if np.isfinite(mean - half) and mean - half > 0:
    return "holds"
  if np.isfinite(mean + half) and mean + half < 0:
    return "does not hold"
  return "no significant difference"


def tost(differences, margin: float, alpha: float = 0.05) -> dict[str, float | bool]:
  """Two one-sided t-tests (Lakens 2017) that paired differences lie within (-margin, +margin).

  "No better than" is claimed only when `equivalent`: p = the larger one-sided p-value < alpha, i.e. the
  (1 - 2 alpha) interval lies inside the bounds. NaN entries are dropped; p is NaN with fewer than 2
  values, and for constant values 0 or 1 by whether they lie inside the bounds.
  """
  checks.check_positive("margin", margin)
  checks.check_float("alpha", alpha, maximum=0.5)
  values = np.asarray(differences, np.float64).ravel()
  values = values[np.isfinite(values)]
  if values.size < 2:
    p = float("nan")
  elif np.all(values == values[0]):
    p = float(abs(values[0]) >= margin)
  else:
    p = float(DescrStatsW(values).ttost_mean(-margin, margin)[0])
  return {"margin": float(margin), "p": p, "equivalent": bool(np.isfinite(p) and p < alpha)}


def auc(scores, positive) -> float:
  """Area under the ROC curve of `scores` (N,) for the boolean labels `positive` (N,).

  0.5 means the score carries no information; below 0.5 means low scores mark the positives.
  NaN when only one class is present.
  """
  scores = np.asarray(scores, dtype=np.float64)
  positive = np.asarray(positive, dtype=bool)
  if positive.all() or not positive.any():
    return float("nan")
  return float(roc_auc_score(positive, scores))
