"""Validation that does not fool itself on few runs: grouped splits (a configuration's seeds never straddle train
and test), out-of-fold predictions, skill metrics, a permutation test of the whole pipeline, a conditional
permutation of one feature block within bins of the confounds, and leave-one-group-out as an optimism check."""

from __future__ import annotations

import joblib
import numpy as np
import scipy.stats
from sklearn.base import clone
from sklearn.linear_model import LinearRegression
from sklearn.metrics import brier_score_loss, mean_absolute_error
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, cross_val_predict, permutation_test_score

from metasel import checks, stats

__all__ = ["grouped_splits", "leave_one_group_out", "out_of_fold", "mae", "skill", "rank_within", "auroc", "brier",
           "coverage", "permutation_test", "confound_bins", "permute_within", "conditional_permutation_test",
           "block_permutation", "group_permutation_test", "optimism"]


def _check_groups(groups, needed: int, what: str) -> np.ndarray:
  groups = np.asarray(groups)
  found = np.unique(groups).size
  if found < needed:
    raise ValueError(
        f"{what} needs at least {needed} groups, but the corpus has {found} ({', '.join(map(str, np.unique(groups)[:5]))});"
        " expected runs of several configurations (a group is a dataset and configuration, all its seeds)"
    )
  return groups


def grouped_splits(groups, folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) row indices of grouped k-fold: every group's rows fall in one test fold."""
  checks.check_int("folds", folds, minimum=2)
  groups = _check_groups(groups, folds, f"grouped {folds}-fold cross-validation")
  return list(GroupKFold(n_splits=folds).split(np.zeros(groups.size), groups=groups))


def leave_one_group_out(groups) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) indices holding out one group at a time (e.g. a whole dataset)."""
  groups = _check_groups(groups, 2, "leave-one-group-out")
  return list(LeaveOneGroupOut().split(np.zeros(groups.size), groups=groups))


def out_of_fold(estimator, x, y, splits, method: str = "predict") -> np.ndarray:
  """Each row's prediction by the model fitted without its fold (`method` "predict_proba" gives P(class 1))."""
  if method != "predict_proba":
    return cross_val_predict(clone(estimator), x, y, cv=splits, method=method)
  x, y = np.asarray(x), np.asarray(y)
  probability = np.full(len(y), np.nan)
  for train, test in splits:
    if np.unique(y[train]).size < 2:  # a fold that saw one class is certain of it
      probability[test] = float(y[train][0] == 1)
      continue
    model = clone(estimator).fit(x[train], y[train])
    probability[test] = model.predict_proba(x[test])[:, list(model.classes_).index(1)]
  return probability


def mae(y, prediction) -> float:
  return float(mean_absolute_error(y, prediction))


def skill(model_mae: float, baseline_mae: float) -> float:
  """1 - MAE / baseline MAE: 0 is the baseline's error, 1 is perfect, negative is worse than the baseline."""
  return float(1.0 - model_mae / baseline_mae) if baseline_mae > 0 else float("nan")


def rank_within(y, prediction, groups) -> float:
  """Mean Spearman correlation of prediction and target within each group of at least 3 rows that vary."""
  y, prediction, groups = np.asarray(y), np.asarray(prediction), np.asarray(groups)
  values = []
  for group in np.unique(groups):
    rows = groups == group
    if rows.sum() >= 3 and np.ptp(y[rows]) > 0 and np.ptp(prediction[rows]) > 0:
      values.append(scipy.stats.spearmanr(y[rows], prediction[rows]).statistic)
  return float(np.mean(values)) if values else float("nan")


def auroc(helps, score) -> float:
  return stats.auc(score, np.asarray(helps, bool))


def brier(helps, probability) -> float:
  return float(brier_score_loss(np.asarray(helps, bool), np.clip(probability, 0.0, 1.0)))


def coverage(y, low, high) -> float:
  """The share of targets inside their [low, high] interval."""
  y = np.asarray(y)
  return float(np.mean((y >= np.asarray(low)) & (y <= np.asarray(high))))


def _null(score, orders, n_jobs: int | None) -> np.ndarray:
  """`score(order)` for each permutation `order`, over `n_jobs` processes (the orders are drawn beforehand, so
  the result does not depend on `n_jobs`)."""
  return np.asarray(joblib.Parallel(n_jobs=n_jobs)(joblib.delayed(score)(order) for order in orders))


def _result(observed: float, null: np.ndarray) -> dict:
  """The observed MAE, the null's median and p = (1 + #{null MAE <= observed}) / (1 + n)."""
  return {"mae": float(observed), "null_mae_median": float(np.median(null)),
          "p": float((1 + np.sum(null <= observed)) / (1 + null.size)), "permutations": int(null.size)}


def permutation_test(estimator, x, y, splits, strata=None, permutations: int = 500, seed: int = 0, n_jobs: int | None = None) -> dict:
  """Permutation test of the whole pipeline (scikit-learn's `permutation_test_score`), scored by out-of-fold MAE.

  The targets are permuted row by row within each stratum (`strata`, e.g. the cutoff; all rows when None)
  and the model refitted on the same grouped splits each time; this treats rows as exchangeable, which
  clustered rows are not (`group_permutation_test` exchanges whole groups).
  p = (1 + #{permuted MAE <= observed}) / (1 + n).
  """
  checks.check_int("permutations", permutations)
  score, null, p = permutation_test_score(
      clone(estimator), x, y, groups=strata, cv=splits, n_permutations=permutations,
      scoring="neg_mean_absolute_error", random_state=seed, n_jobs=n_jobs,
  )
  return {"mae": float(-score), "null_mae_median": float(-np.median(null)), "p": float(p), "permutations": permutations}


def confound_bins(cutoffs, accuracy, per_cutoff: int = 5, strata=None) -> np.ndarray:
  """A bin label per row: its cutoff (and stratum, e.g. its dataset, when given), and its accuracy's quantile bin
  (`per_cutoff` of them) among the rows of that cutoff (and stratum)."""
  checks.check_int("per_cutoff", per_cutoff)
  cutoffs, accuracy = np.asarray(cutoffs), np.asarray(accuracy, np.float64)
  keys = cutoffs.astype(str) if strata is None else np.char.add(np.asarray(strata).astype(str), "|" + cutoffs.astype(str))
  bins = np.zeros(cutoffs.size, np.int64)
  for i, key in enumerate(np.unique(keys)):
    rows = keys == key
    ranks = scipy.stats.rankdata(accuracy[rows], method="ordinal") - 1
    bins[rows] = i * per_cutoff + (ranks * per_cutoff) // rows.sum()
  return bins


def permute_within(bins, rng: np.random.Generator) -> np.ndarray:
  """A permutation of row indices that sends every row to a row of the same bin."""
  bins = np.asarray(bins)
  order = np.arange(bins.size)
  for b in np.unique(bins):
    rows = np.flatnonzero(bins == b)
    order[rows] = rng.permutation(rows)
  return order


def conditional_permutation_test(estimator, fixed, block, y, splits, bins, permutations: int = 500, seed: int = 0,
                                 n_jobs: int | None = None) -> dict:
  """Does `block` (e.g. the per-sample summaries) add skill beyond `fixed` (the curve features)?

  The block is split into its least-squares prediction from `fixed` and a residual; only the residual's rows
  are permuted, within `bins` (of the confounds: cutoff and current accuracy), as in Freedman and Lane's
  permutation of residuals. The null block keeps its linear link to every fixed feature and to the bins,
  and loses any further link to the target. The model on [fixed, block] is refitted each time;
  p = (1 + #{permuted MAE <= observed}) / (1 + n).
  """
  checks.check_int("permutations", permutations)
  fixed, block = np.asarray(fixed, np.float64), np.asarray(block, np.float64)
  explained = LinearRegression().fit(fixed, block).predict(fixed)
  residual = block - explained
  observed = mae(y, out_of_fold(estimator, np.hstack([fixed, block]), y, splits))
  rng = np.random.default_rng(seed)
  orders = [permute_within(bins, rng) for _ in range(permutations)]
  score = lambda order: mae(y, out_of_fold(estimator, np.hstack([fixed, explained + residual[order]]), y, splits))  # noqa: E731
  return _result(observed, _null(score, orders, n_jobs))


def block_permutation(groups, rng: np.random.Generator) -> np.ndarray:
  """Row indices that move every group's rows, in their order, onto another group's rows: the groups are
  shuffled as wholes (all groups must have the same number of rows), keeping each group's internal structure."""
  groups = np.asarray(groups)
  names, sizes = np.unique(groups, return_counts=True)
  if np.unique(sizes).size != 1:
    raise ValueError(f"a block permutation needs groups of one size; got sizes {sorted(set(sizes.tolist()))}")
  rows = [np.flatnonzero(groups == name) for name in names]
  order = np.arange(groups.size)
  for target, source in zip(rows, rng.permutation(len(rows))):
    order[target] = rows[source]
  return order


def group_permutation_test(estimator, x, y, splits, groups, permutations: int = 500, seed: int = 0, n_jobs: int | None = None) -> dict:
  """Permutation test of the whole pipeline for clustered rows: the targets of whole groups (a configuration's
  seeds and cutoffs, in one order) are exchanged, so each group keeps its internal correlation.
  p = (1 + #{permuted MAE <= observed}) / (1 + n)."""
  checks.check_int("permutations", permutations)
  observed = mae(y, out_of_fold(estimator, x, y, splits))
  rng = np.random.default_rng(seed)
  orders = [block_permutation(groups, rng) for _ in range(permutations)]
  score = lambda order: mae(y[order], out_of_fold(estimator, x, y[order], splits))  # noqa: E731
  return _result(observed, _null(score, orders, n_jobs))


def optimism(estimator, x, y, groups, folds: int = 5) -> dict:
  """Out-of-fold MAE under grouped k-fold and under leave-one-group-out; k-fold trains on less, so a k-fold MAE
  well below leave-one-group-out's would flag optimism."""
  kfold = mae(y, out_of_fold(estimator, x, y, grouped_splits(groups, folds)))
  logo = mae(y, out_of_fold(estimator, x, y, leave_one_group_out(groups)))
  return {"kfold_mae": kfold, "logo_mae": logo, "kfold_minus_logo": kfold - logo}
