"""The dataset record every loader returns: numpy splits plus the metadata methods need."""

from __future__ import annotations

import dataclasses

import numpy as np

CLEAN_TIER = 0  # tier 0 is always clean data; any other tier is a kind of corruption


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: features `x` (N, ...), targets `y` (N,), and each sample's true quality tier (N,).

  `y` is int32 class ids for classification and float32 values for regression.
  `tier` is int32; `tier == 0` marks clean samples, other values index `Dataset.tier_names`.
  `source_index` (N,) optionally records each sample's row in the file or pool it came from, so that
  disjointness of splits can be checked and results traced back to raw data.
  """

  x: np.ndarray
  y: np.ndarray
  tier: np.ndarray
  source_index: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.x)
    if len(self.y) != n or len(self.tier) != n:
      raise ValueError(
          f"split arrays disagree in length: x has {n} rows, y {len(self.y)}, tier {len(self.tier)};"
          " expected the same number of samples in each"
      )

  def __len__(self) -> int:
    return len(self.x)

  @property
  def is_clean(self) -> np.ndarray:
    """Boolean mask (N,) of samples whose true tier is clean."""
    return self.tier == CLEAN_TIER


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/val/test splits of one task, with what a method needs to know about them.

  Attributes:
    name: the spec it was loaded from, e.g. "mixture" or "csv:/path/train.csv".
    train, val, test: disjoint splits. For generated mixtures `val` holds clean data only.
    num_classes: number of classes, or 0 for regression.
    feature_names: one name per feature column (flattened for images).
    tier_names: names of the quality tiers; index 0 is "clean".
    class_names: one name per class (empty for regression).
  """

  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  feature_names: tuple[str, ...]
  tier_names: tuple[str, ...] = ("clean",)
  class_names: tuple[str, ...] = ()

  @property
  def task(self) -> str:
    """"classification" or "regression"."""
    return "regression" if self.num_classes == 0 else "classification"

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one sample's features, without the batch axis."""
    return tuple(self.train.x.shape[1:])
