"""The forecasting models: scikit-learn learners (ridge, gradient boosting, quantile boosting, logistic), and
`Forecaster`, the gradient-boosted forecasters with residual intervals that `metasel forecast` applies."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from metasel.forecast import features, validation
from metasel.forecast.table import Table

__all__ = ["ridge", "boosting", "quantile_boosting", "logistic", "boosting_classifier", "feature_matrix", "FEATURE_SETS",
           "INTERVALS", "Forecaster", "within_range", "residual_splits", "interval_residuals", "fit_forecaster"]

ALPHAS = np.logspace(-3, 3, 13)
FEATURE_SETS = ("curve", "full")
INTERVALS = (0.8, 0.9)
REGRESSED = ("final_change", "gain", "plateau")  # "final" is the level plus the forecast "final_change"


def ridge():
  """Standardised ridge regression, its penalty chosen by efficient leave-one-out."""
  return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))


def boosting(loss: str = "absolute_error", quantile: float | None = None, seed: int = 0):
  """Small histogram gradient boosting (few hundred rows): shallow trees, strong leaf minimum."""
  return HistGradientBoostingRegressor(loss=loss, quantile=quantile, max_iter=150, learning_rate=0.05, max_leaf_nodes=8,
                                       min_samples_leaf=20, random_state=seed)


def quantile_boosting(quantile: float, seed: int = 0):
  return boosting("quantile", quantile, seed)


def logistic():
  return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def boosting_classifier(seed: int = 0):
  return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=8, min_samples_leaf=20, random_state=seed)


def feature_matrix(table: Table, feature_set: str) -> np.ndarray:
  """The table's features of one set: "curve", "full" (curve and per-sample), "epoch" or "accuracy" alone."""
  if feature_set == "curve":
    return table.curve
  if feature_set == "full":
    if np.isnan(table.sample).any():
      raise ValueError("feature set 'full' needs the per-sample summaries of every run; some runs lack them")
    return np.hstack([table.curve, table.sample])
  if feature_set in ("epoch", "accuracy"):
    return table.curve[:, [features.CURVE_FEATURES.index(feature_set)]]
  raise ValueError(f"unknown feature set {feature_set!r}; expected 'curve', 'full', 'epoch' or 'accuracy'")


def _names(feature_set: str) -> tuple[str, ...]:
  return features.CURVE_FEATURES + (features.SAMPLE_FEATURES if feature_set == "full" else ())


@dataclasses.dataclass(frozen=True)
class Forecaster:
  """Gradient-boosted forecasters of one feature set, fitted on a corpus table, with interval offsets per cutoff.

  Attributes:
    feature_set: "curve" or "full". estimators: per target, a fitted scikit-learn model ("final_change",
      "gain", "plateau": `boosting`; "helps": `boosting_classifier`).
    residuals: per regressed target, cutoff -> {"0.8": [low, high], "0.9": ...}: quantiles of the
      leave-one-dataset-out residuals at that cutoff (`interval_residuals`), added to a forecast for its
      intervals.
    budget, horizon, cutoffs: the corpus's; forecasts are made at cutoffs within [min, max].
    corpus: a description of the corpus it was trained on.
  """

  feature_set: str
  estimators: dict
  residuals: dict
  budget: int
  horizon: int
  cutoffs: tuple[int, ...]
  corpus: dict

  @property
  def names(self) -> tuple[str, ...]:
    return _names(self.feature_set)

  def band(self, target: str, cutoff: int, level: float) -> list[float]:
    """The residual interval (low, high) of `target` at the known cutoff nearest to `cutoff`."""
    known = np.array(sorted(int(c) for c in self.residuals[target]))
    return list(self.residuals[target][str(known[np.argmin(np.abs(known - cutoff))])][f"{level}"])

  def point(self, target: str, x) -> np.ndarray:
    """Point forecasts of a regressed target for feature rows `x` (R, F), within the target's range."""
    return within_range(target, self.estimators[target].predict(x), self.budget)

  def predict(self, row: dict[str, float]) -> dict:
    """Forecasts and intervals for one run's feature row (`features.curve_features` [+ `sample_features`])."""
    x = np.array([[row[name] for name in self.names]], np.float64)
    out = {}
    for target in REGRESSED:
      value = float(self.point(target, x)[0])
      out[target] = value
      out[f"{target}_intervals"] = {level: [value + r for r in self.band(target, int(row["epoch"]), level)] for level in INTERVALS}
    helps = self.estimators["helps"]
    out["helps_probability"] = float(dict(zip(helps.classes_, helps.predict_proba(x)[0])).get(1, 0.0))
    out["final"] = float(np.clip(row["accuracy"] + out["final_change"], 0.0, 1.0))
    out["final_intervals"] = {level: np.clip(row["accuracy"] + np.asarray(band), 0.0, 1.0).tolist()
                              for level, band in out["final_change_intervals"].items()}
    out["plateau_intervals"] = {level: np.clip(band, 1, self.budget).tolist() for level, band in out["plateau_intervals"].items()}
    return out


def within_range(target: str, prediction, budget: int) -> np.ndarray:
  """Forecasts of `target` kept where the target can be: a plateau epoch within [1, budget]."""
  prediction = np.asarray(prediction, np.float64)
  return np.clip(prediction, 1, budget) if target == "plateau" else prediction


def residual_splits(table: Table, folds: int = 5) -> list:
  """The splits whose out-of-fold residuals size a forecaster's intervals: leave one dataset out, so that the
  intervals are those of a run of a dataset the models have not seen (grouped k-fold by configuration for a
  corpus of one dataset)."""
  if np.unique(table.datasets).size >= 2:
    return validation.leave_one_group_out(table.datasets)
  return validation.grouped_splits(table.groups, folds)


def interval_residuals(table: Table, feature_set: str, folds: int = 5) -> dict:
  """Per regressed target and cutoff, the 80% and 90% central quantiles of the out-of-fold residuals of
  `residual_splits`, of forecasts kept `within_range` as `Forecaster.point` keeps them."""
  x = feature_matrix(table, feature_set)
  splits = residual_splits(table, folds)
  result = {}
  for target in REGRESSED:
    y = table.targets[target]
    error = y - within_range(target, validation.out_of_fold(boosting(), x, y, splits), table.budget)
    result[target] = {
        str(int(c)): {f"{level}": [float(np.quantile(error[table.cutoffs == c], q)) for q in ((1 - level) / 2, (1 + level) / 2)]
                      for level in INTERVALS}
        for c in np.unique(table.cutoffs)
    }
  return result


def fit_forecaster(table: Table, feature_set: str, residuals: dict | None = None, folds: int = 5, corpus: dict | None = None) -> Forecaster:
  """Forecasters of `feature_set` fitted on the whole table; `residuals` from `interval_residuals` (computed
  here when None)."""
  x = feature_matrix(table, feature_set)
  estimators = {target: clone(boosting()).fit(x, table.targets[target]) for target in REGRESSED}
  helps = table.targets["helps"].astype(int)
  estimators["helps"] = (DummyClassifier(strategy="prior") if np.unique(helps).size < 2 else boosting_classifier()).fit(x, helps)
  return Forecaster(
      feature_set=feature_set, estimators=estimators,
      residuals=residuals if residuals is not None else interval_residuals(table, feature_set, folds),
      budget=table.budget, horizon=table.horizon, cutoffs=tuple(int(c) for c in np.unique(table.cutoffs)), corpus=corpus or {},
  )
