"""The dataset record every loader returns: numpy splits plus the metadata methods need."""

from __future__ import annotations

import dataclasses

import numpy as np

CLEAN_TIER = 0  # tier 0 is always clean data; any other tier is a kind of corruption
REAL_GROUP = 0  # group 0 is real data
SYNTHETIC_GROUP = 1  # generated or derived data, in datasets whose group_names are MIXED_GROUPS
MIXED_GROUPS = ("real", "synthetic")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: features `x` (N, ...), targets `y` (N,), and each sample's true quality tier (N,).

  `y` is int32 class ids for classification and float32 values for regression.
  `tier` is int32; `tier == 0` marks clean samples, other values index `Dataset.tier_names`.
  `source_index` (N,) optionally records each sample's row in the file or pool it came from, so that
  disjointness of splits can be checked and results traced back to raw data.
  `group` (N,) optionally marks each sample as real (0) or synthetic (1), indexing `Dataset.group_names`,
  so that methods can be scored per origin; None means every sample is real (see `groups`).
  """

  x: np.ndarray
  y: np.ndarray
  tier: np.ndarray
  source_index: np.ndarray | None = None
  group: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.x)
    if len(self.y) != n or len(self.tier) != n:
      raise ValueError(
          f"split arrays disagree in length: x has {n} rows, y {len(self.y)}, tier {len(self.tier)};"
          " expected the same number of samples in each"
      )
    if self.group is not None and len(self.group) != n:
      raise ValueError(f"split group has {len(self.group)} entries but x has {n} rows; expected one per sample")

  def __len__(self) -> int:
    return len(self.x)

  @property
  def is_clean(self) -> np.ndarray:
    """Boolean mask (N,) of samples whose true tier is clean."""
    return self.tier == CLEAN_TIER

  @property
  def groups(self) -> np.ndarray:
    """int32 group of every sample (N,): `group`, or all real (zeros) when the split records none."""
    return np.full(len(self), REAL_GROUP, np.int32) if self.group is None else self.group


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/val/test splits of one task, with what a method needs to know about them.

  Attributes:
    name: the spec it was loaded from, e.g. "mixture" or "csv:/path/train.csv".
    train, val, test: disjoint splits. For generated mixtures `val` holds clean data only.
    num_classes: number of classes, or 0 for regression.
    feature_names: one name per feature column (flattened for images), or per token position for tokens.
    tier_names: names of the quality tiers; index 0 is "clean".
    class_names: one name per class (empty for regression).
    group_names: names of the sample groups that `Split.group` indexes; index 0 is "real".
    vocabulary: for token datasets, the token string of each id (x holds int32 ids, 0 is padding), so a
      model reads its vocabulary size as `len(vocabulary)`; empty for every other dataset.
  """

  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  feature_names: tuple[str, ...]
  tier_names: tuple[str, ...] = ("clean",)
  class_names: tuple[str, ...] = ()
  group_names: tuple[str, ...] = ("real",)
  vocabulary: tuple[str, ...] = ()

  @property
  def task(self) -> str:
    """"classification" or "regression"."""
    return "regression" if self.num_classes == 0 else "classification"

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one sample's features, without the batch axis."""
    return tuple(self.train.x.shape[1:])

  @property
  def is_tokens(self) -> bool:
    """True when x holds token ids into `vocabulary` rather than features."""
    return bool(self.vocabulary)
