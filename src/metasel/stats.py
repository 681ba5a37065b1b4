"""Summaries across seeds: mean with a Student-t confidence interval, its verdict, equivalence and superiority tests
of paired differences with Holm's correction, the seeds an equivalence test needs, and AUC."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metasel import checks, extras

try:
  import scipy.stats
  from sklearn.metrics import roc_auc_score
  from statsmodels.stats.multitest import multipletests
  from statsmodels.stats.weightstats import DescrStatsW
except ModuleNotFoundError as error:
  raise extras.missing(error, needed_by="metasel.stats") from None

__all__ = [
    "Interval", "mean_ci", "verdict", "tost", "one_sided_p", "holm", "VERDICTS", "comparison_verdict", "tost_power",
    "tost_seeds", "auc",
]


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


def _finite(values) -> np.ndarray:
  """The finite entries of `values`, flattened to float64 (the paired tests drop NaN seeds)."""
  values = np.asarray(values, np.float64).ravel()
  return values[np.isfinite(values)]


def tost(differences, margin: float, alpha: float = 0.05) -> dict[str, float | bool]:
  """Two one-sided t-tests (Lakens 2017) that paired differences lie within (-margin, +margin).

  "No better than" is claimed only when `equivalent`: p = the larger one-sided p-value < alpha, i.e. the
  (1 - 2 alpha) interval lies inside the bounds. NaN entries are dropped; p is NaN with fewer than 2
  values, and for constant values 0 or 1 by whether they lie inside the bounds.
  """
  checks.check_positive("margin", margin)
  checks.check_float("alpha", alpha, maximum=0.5)
  values = _finite(differences)
  if values.size < 2:
    p = float("nan")
  elif np.all(values == values[0]):
    p = float(abs(values[0]) >= margin)
  else:
    p = float(DescrStatsW(values).ttost_mean(-margin, margin)[0])
  return {"margin": float(margin), "p": p, "equivalent": bool(np.isfinite(p) and p < alpha)}


def one_sided_p(differences, alternative: str = "greater") -> float:
  """p-value of a one-sided one-sample t-test that paired differences have mean > 0 ("greater") or < 0 ("less").

  NaN entries are dropped; NaN with fewer than 2 values; for constant values 0 or 1 by their sign.
  """
  checks.check_choice("alternative", alternative, ("greater", "less"))
  values = _finite(differences)
  if values.size < 2:
    return float("nan")
  if np.all(values == values[0]):
    return float(values[0] <= 0) if alternative == "greater" else float(values[0] >= 0)
  return float(scipy.stats.ttest_1samp(values, 0.0, alternative=alternative).pvalue)


def holm(pvalues, alpha: float = 0.05) -> np.ndarray:
  """Holm-adjusted p-values (statsmodels' `multipletests`) of a family; NaN entries stay NaN and are not counted."""
  p = np.asarray(pvalues, np.float64)
  adjusted = np.full(p.shape, np.nan)
  finite = np.isfinite(p)
  if finite.any():
    adjusted[finite] = multipletests(p[finite], alpha=alpha, method="holm")[1]
  return adjusted


VERDICTS = ("beats uniform", "equivalent to uniform", "worse", "inconclusive")


def comparison_verdict(superior_p: float, inferior_p: float, tost_p: float, alpha: float = 0.05) -> str:
  """One of `VERDICTS` from (Holm-adjusted) one-sided p-values and the TOST p-value of a paired difference.

  Equivalence (the (1 - 2 alpha) interval inside the margin) comes first: a significant difference smaller
  than the margin fixed in advance is not one that matters. Then a significant gain ("beats uniform") or
  loss ("worse"); otherwise the seeds cannot tell ("inconclusive").
  """
  if np.isfinite(tost_p) and tost_p < alpha:
    return VERDICTS[1]
  if np.isfinite(superior_p) and superior_p < alpha:
    return VERDICTS[0]
  if np.isfinite(inferior_p) and inferior_p < alpha:
    return VERDICTS[2]
  return VERDICTS[3]


def tost_power(n: int, sd: float, margin: float, alpha: float = 0.05) -> float:
  """Approximate power of a paired TOST with n pairs when the true difference is 0 (noncentral t, scipy).

  Power = 2 P(T' > t_{1-alpha, n-1}) - 1 with T' noncentral t of n - 1 degrees of freedom and
  noncentrality margin / (sd / sqrt(n)), clipped at 0 (Julious 2004).
  """
  checks.check_int("n", n, minimum=2)
  checks.check_positive("margin", margin)
  if not np.isfinite(sd) or sd < 0:
    return float("nan")
  if sd == 0:
    return 1.0
  critical = scipy.stats.t.ppf(1 - alpha, n - 1)
  tail = scipy.stats.nct.sf(critical, n - 1, margin / (sd / np.sqrt(n)))
  return float(max(0.0, 2 * tail - 1))


def tost_seeds(sd: float, margin: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
  """The fewest pairs (seeds) for `tost_power` >= power given the spread `sd` of paired differences; None above `most`
  or when the spread is not a finite number."""
  checks.check_float("power", power, maximum=1.0)
  if not np.isfinite(sd):
    return None
  for n in range(2, most + 1):
    if tost_power(n, sd, margin, alpha) >= power:
      return n
  return None


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
