"""Validated datasets from numpy arrays, and the class-stratified subsets every loader draws its splits with.

`from_arrays` is how every loader (and a user with arrays of their own) builds a `Dataset`; nothing here
reads files, so the loaders import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metasel.checks import check_int
from metasel.data.dataset import CLEAN_TIER, Dataset, Split

__all__ = ["SPLITS", "SplitLike", "from_arrays", "stratified_subsets", "tier_counts"]

SPLITS = ("train", "val", "test")

# A split given to `from_arrays`: a `Split`, or a tuple (x, y), (x, y, tier), (x, y, tier, source_index)
# or (x, y, tier, source_index, group).
SplitLike = Split | Sequence[Any]


def from_arrays(
    train: SplitLike,
    val: SplitLike,
    test: SplitLike,
    *,
    name: str = "arrays",
    num_classes: int | None = None,
    feature_names: Sequence[str] | None = None,
    tier_names: Sequence[str] = ("clean",),
    class_names: Sequence[str] = (),
    group_names: Sequence[str] = ("real",),
    check_disjoint: bool = True,
    vocabulary: Sequence[str] = (),
) -> Dataset:
  """Build a `Dataset` from numpy splits after checking shapes, dtypes, finiteness and label ranges.

  Each split is a `Split` or a tuple `(x, y[, tier[, source_index[, group]]])` with x (N, ...) and y (N,).
  `num_classes=None` infers it: 0 (regression) for float targets, else `max(y) + 1`. Integer targets
  become int32 class ids, float targets float32, float (and bool) features float32, integer features
  int32, tiers and groups int32 (default all clean; no group means all real). Groups index
  `group_names`, e.g. ("real", "synthetic").
  With `check_disjoint`, splits that all carry `source_index` must not share an index.
  A non-empty `vocabulary` (the token of each id) makes a token dataset: every x must be integer ids
  (N, L) in [0, len(vocabulary)), and feature_names default to one per position, "t0", "t1", ...
  """
  vocabulary = _check_vocabulary(vocabulary)
  raw = {name_: _as_tuple(name_, s) for name_, s in zip(SPLITS, (train, val, test))}
  ys = [np.asarray(r[1]) for r in raw.values()]
  regression = all(np.issubdtype(y.dtype, np.floating) for y in ys)
  if num_classes is None:
    num_classes = 0 if regression else int(max(int(y.max(initial=-1)) for y in ys)) + 1
  check_int("num_classes", num_classes, minimum=0)
  if num_classes == 0 and not regression:
    raise ValueError("num_classes=0 means regression and needs float targets y; got integer targets")
  splits = {
      split: _check_split(
          split, *r, num_classes=num_classes, num_tiers=len(tier_names), num_groups=len(group_names),
          vocab_size=len(vocabulary),
      )
      for split, r in raw.items()
  }
  shapes = {split: s.x.shape[1:] for split, s in splits.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"splits disagree in feature shape: {shapes}; expected one shape (without the batch axis)")
  num_features = int(np.prod(shapes["train"]))
  if feature_names is None:
    feature_names = tuple(f"{'t' if vocabulary else 'x'}{i}" for i in range(num_features))
  if len(feature_names) != num_features:
    raise ValueError(f"got {len(feature_names)} feature_names for {num_features} features; expected one per feature")
  if not tier_names or tier_names[CLEAN_TIER] != "clean":
    raise ValueError(f"tier_names must start with 'clean', got {tuple(tier_names)!r}")
  if not group_names or group_names[0] != "real":
    raise ValueError(f"group_names must start with 'real', got {tuple(group_names)!r}")
  if num_classes and class_names and len(class_names) != num_classes:
    raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}; expected one per class")
  if check_disjoint:
    _check_disjoint(splits)
  return Dataset(
      name=name,
      num_classes=num_classes,
      feature_names=tuple(str(f) for f in feature_names),
      tier_names=tuple(tier_names),
      class_names=tuple(str(c) for c in class_names),
      group_names=tuple(str(g) for g in group_names),
      vocabulary=vocabulary,
      **splits,
  )


def _check_vocabulary(vocabulary: Sequence[str]) -> tuple[str, ...]:
  """`vocabulary` as a tuple of distinct strings (empty for non-token data), or a ValueError saying what is wrong."""
  if isinstance(vocabulary, str) or not isinstance(vocabulary, Sequence):
    raise ValueError(f"vocabulary must be a sequence of token strings (one per id), got {type(vocabulary).__name__}")
  bad = [v for v in vocabulary if not isinstance(v, str)]
  if bad:
    raise ValueError(f"vocabulary holds {len(bad)} non-string entries (first: {bad[0]!r}); expected one string per id")
  seen: dict[str, int] = {}
  for i, token in enumerate(vocabulary):
    if token in seen:
      raise ValueError(f"vocabulary lists {token!r} twice (ids {seen[token]} and {i}); expected distinct tokens")
    seen[token] = i
  return tuple(vocabulary)


def _as_tuple(split: str, value: SplitLike) -> tuple:
  """(x, y, tier, source_index, group) of one split given as a `Split` or a 2- to 5-tuple."""
  if isinstance(value, Split):
    return value.x, value.y, value.tier, value.source_index, value.group
  if not isinstance(value, (tuple, list)) or not 2 <= len(value) <= 5:
    raise ValueError(
        f"{split} split must be a Split or a tuple (x, y[, tier[, source_index[, group]]]),"
        f" got {type(value).__name__}"
    )
  return tuple(value) + (None,) * (5 - len(value))


def _check_split(
    split, x, y, tier, source_index, group, *, num_classes: int, num_tiers: int, num_groups: int, vocab_size: int = 0
) -> Split:
  """One validated split with canonical dtypes; errors name the split and the bad value."""
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim < 2:
    raise ValueError(f"{split} x has shape {x.shape}; expected (N, ...) with a feature axis, e.g. x[:, None]")
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise ValueError(f"{split} x has dtype {x.dtype}; expected numbers")
  n = x.shape[0]
  if n == 0:
    raise ValueError(f"{split} split is empty; expected at least one sample")
  if y.shape != (n,):
    raise ValueError(f"{split} y has shape {y.shape} but x has {n} rows; expected y of shape ({n},)")
  x = _check_tokens(split, x, vocab_size) if vocab_size else _check_features(split, x)
  if num_classes == 0:
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
      raise ValueError(f"{split} y has NaN or inf targets; expected finite regression targets")
  else:
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{split} y has dtype {y.dtype}; expected integer class ids for num_classes={num_classes}")
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(
          f"{split} y has class ids in [{y.min()}, {y.max()}];"
          f" expected 0..{num_classes - 1} for num_classes={num_classes}"
      )
    missing = np.setdiff1d(np.arange(num_classes), y)
    if missing.size:
      raise ValueError(
          f"{split} split has no samples of class {missing.tolist()[:10]} (num_classes={num_classes});"
          " expected every class present in every split"
      )
    y = y.astype(np.int32)
  tier = np.full(n, CLEAN_TIER, np.int32) if tier is None else np.asarray(tier)
  if tier.shape != (n,) or not np.issubdtype(tier.dtype, np.integer):
    raise ValueError(f"{split} tier has shape {tier.shape} and dtype {tier.dtype}; expected ({n},) integers")
  if tier.min() < 0 or tier.max() >= num_tiers:
    raise ValueError(
        f"{split} tier has values in [{tier.min()}, {tier.max()}]; expected 0..{num_tiers - 1} (tier_names)"
    )
  if source_index is not None:
    source_index = np.asarray(source_index)
    if source_index.shape != (n,) or not np.issubdtype(source_index.dtype, np.integer):
      raise ValueError(
          f"{split} source_index has shape {source_index.shape} and dtype {source_index.dtype};"
          f" expected ({n},) integers"
      )
    source_index = source_index.astype(np.int64)
  if group is not None:
    group = np.asarray(group)
    if group.shape != (n,) or not np.issubdtype(group.dtype, np.integer):
      raise ValueError(f"{split} group has shape {group.shape} and dtype {group.dtype}; expected ({n},) integers")
    if group.min() < 0 or group.max() >= num_groups:
      raise ValueError(
          f"{split} group has values in [{group.min()}, {group.max()}]; expected 0..{num_groups - 1} (group_names)"
      )
    group = group.astype(np.int32)
  return Split(x, y, tier.astype(np.int32), source_index, group)


def _check_features(split: str, x: np.ndarray) -> np.ndarray:
  """Features with canonical dtype: integer x as int32 (when its values fit), float and bool x as finite float32."""
  if np.issubdtype(x.dtype, np.integer):
    info = np.iinfo(np.int32)
    if x.min() < info.min or x.max() > info.max:
      raise ValueError(
          f"{split} x has integer values in [{x.min()}, {x.max()}]; expected values that fit int32"
          f" ([{info.min}, {info.max}]) or float features"
      )
    return x.astype(np.int32)
  x = x.astype(np.float32)
  bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if bad.any():
    raise ValueError(
        f"{split} x has {int(bad.sum())} rows with NaN or inf features (first: row {int(np.argmax(bad))});"
        " expected finite values"
    )
  return x


def _check_tokens(split: str, x: np.ndarray, vocab_size: int) -> np.ndarray:
  """Token ids (N, L) as int32, or a ValueError when they are not integers in [0, vocab_size)."""
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(
        f"{split} x has shape {x.shape} and dtype {x.dtype}; expected integer token ids (N, L) with a vocabulary"
    )
  if x.min() < 0 or x.max() >= vocab_size:
    raise ValueError(
        f"{split} x has token ids in [{x.min()}, {x.max()}]; expected ids 0..{vocab_size - 1}"
        f" (a vocabulary of {vocab_size} tokens)"
    )
  return x.astype(np.int32)


def _check_disjoint(splits: Mapping[str, Split]) -> None:
  """Raise if two splits that both record `source_index` share a source row."""
  for i, a in enumerate(SPLITS):
    for b in SPLITS[i + 1 :]:
      ia, ib = splits[a].source_index, splits[b].source_index
      if ia is None or ib is None:
        continue
      shared = np.intersect1d(ia, ib)
      if shared.size:
        raise ValueError(
            f"{a} and {b} splits share {shared.size} source rows (e.g. {shared[:5].tolist()}); expected disjoint splits"
        )


def stratified_subsets(
    y: np.ndarray, sizes: Sequence[int | None], seed: int | np.random.Generator, *, names: Sequence[str] | None = None
) -> list[np.ndarray]:
  """Disjoint, class-stratified random subsets of the rows of `y` (N,), one per entry of `sizes`.

  Each subset takes every class in proportion to what is left of it, and at least one row of every
  class. One size may be None: that subset takes all rows the others leave. Returns sorted row indices.
  Raises a ValueError naming the subset when the sizes exceed the rows or a class would be empty.
  """
  y = np.asarray(y)
  names = list(names or [f"subset {i}" for i in range(len(sizes))])
  rng = np.random.default_rng(seed)
  classes, inverse = np.unique(y, return_inverse=True)
  total = sum(s for s in sizes if s is not None)
  if total > len(y) or (None in sizes and total == len(y)):
    asked = ", ".join(f"{n}={s}" for n, s in zip(names, sizes) if s is not None)
    raise ValueError(
        f"requested sizes ({asked}) add up to {total} rows, but only {len(y)} are available"
        + ("; expected fewer, leaving room for the remaining subset" if None in sizes else "; expected at most that")
    )
  pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
  remaining = np.array([len(p) for p in pools])
  order = [i for i, s in enumerate(sizes) if s is not None] + [i for i, s in enumerate(sizes) if s is None]
  taken = np.zeros(len(classes), int)
  out: list[np.ndarray] = [np.empty(0, np.int64)] * len(sizes)
  for i in order:
    size = int(remaining.sum()) if sizes[i] is None else sizes[i]
    quota = _allocate(size, remaining)
    empty = np.flatnonzero(quota == 0)
    if empty.size:
      raise ValueError(
          f"{names[i]} would have no rows of class {classes[empty[0]].item()!r} ({names[i]} takes {size} rows of"
          f" {len(classes)} classes, {int(remaining[empty[0]])} rows of that class left); expected every class present"
      )
    out[i] = np.sort(np.concatenate([p[t : t + q] for p, t, q in zip(pools, taken, quota)]))
    taken += quota
    remaining -= quota
  return out


def _allocate(size: int, available: np.ndarray) -> np.ndarray:
  """Split `size` over classes in proportion to `available` (largest remainder), at least one each when possible."""
  total = max(int(available.sum()), 1)
  quota, remainder = np.divmod(size * available, total)  # exact integer floor of size * available / total
  quota[np.argsort(-remainder, kind="stable")[: size - int(quota.sum())]] += 1
  for c in np.flatnonzero((quota == 0) & (available > 0)):
    donor = int(np.argmax(quota))
    if quota[donor] > 1:
      quota[donor] -= 1
      quota[c] = 1
  return quota


def tier_counts(fractions: Sequence[float], total: int) -> np.ndarray:
  """Integer counts (one per fraction) that add up to at most `total`, each within one of `fraction * total`."""
  bounds = np.round(np.cumsum(np.concatenate([[0.0], fractions])) * total).astype(int)
  return np.diff(np.minimum(bounds, total))
