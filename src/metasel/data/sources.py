"""Load any dataset by spec string, and build validated datasets from numpy arrays.

`load("sine" | "mixture" | "digits-synthetic" | "csv:PATH" | "tsv:PATH" | "lines:PATH" | "tfds:NAME")`
returns a `Dataset`, and `load("corrupted:SPEC")` turns the dataset SPEC names into a real+synthetic
mixture with known corruption tiers; every loader checks its options before doing any work.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from metasel.data.dataset import CLEAN_TIER, Dataset, Split

SPLITS = ("train", "val", "test")
SPECS = (
    "sine", "mixture", "digits-synthetic", "csv:PATH", "tsv:PATH", "lines:PATH", "tfds:NAME", "corrupted:SPEC"
)

# A split given to `from_arrays`: a `Split`, or a tuple (x, y), (x, y, tier), (x, y, tier, source_index)
# or (x, y, tier, source_index, group).
SplitLike = Split | Sequence[Any]


def load(spec: str, *, seed: int = 0, **options) -> Dataset:
  """Load the dataset named by `spec` with train/val/test splits, deterministically for `seed`.

  Known specs: "sine", "mixture", "digits-synthetic" (generated, no download), "csv:PATH", "tsv:PATH",
  "lines:PATH" (local text files, TF-IDF features) and "tfds:NAME" (TensorFlow Datasets). `options` go to
  the loader; unknown option names raise a ValueError that lists the accepted ones.
  "corrupted:SPEC" loads the classification dataset SPEC and passes it to `synthetic.corrupted_mixture`:
  the options n_real, n_synthetic and tiers go to `corrupted_mixture`, all others to SPEC's loader, and
  both use `seed`.

  Example: `load("csv:ag_news/test.csv", n_train=1000, n_test=200, n_val=200)`, or
  `load("corrupted:csv:ag_news/test.csv", n_real=300, n_synthetic=900, n_train=1500, n_val=200, n_test=400)`.
  """
  from metasel.data import synthetic, text  # imported here: both modules import this one

  if not isinstance(spec, str):
    raise ValueError(f"dataset spec must be a string, got {spec!r}; known specs: {', '.join(SPECS)}")
  check_seed(seed)
  if spec.startswith("corrupted:"):
    inner = spec.removeprefix("corrupted:")
    if not inner:
      raise ValueError(
          f"dataset spec {spec!r} names no dataset to corrupt; expected corrupted:SPEC, e.g. corrupted:csv:PATH"
      )
    own = {k: options.pop(k) for k in keyword_options(synthetic.corrupted_mixture) if k in options}
    synthetic.check_corrupted_options(**own)
    return synthetic.corrupted_mixture(load(inner, seed=seed, **options), seed=seed, **own)
  generated = {"sine": synthetic.sine, "mixture": synthetic.mixture, "digits-synthetic": synthetic.digits_synthetic}
  if spec in generated:
    fn = generated[spec]
    check_options(spec, fn, options)
    return fn(seed=seed, **options)
  kind, sep, target = spec.partition(":")
  if not sep or kind not in ("csv", "tsv", "lines", "tfds"):
    raise ValueError(f"unknown dataset spec {spec!r}; known specs: {', '.join(SPECS)}")
  if not target:
    raise ValueError(f"dataset spec {spec!r} names no {'dataset' if kind == 'tfds' else 'file'}; expected {kind}:...")
  if kind == "tfds":
    check_options(spec, text.load_tfds, options)
    return text.load_tfds(target, seed=seed, **options)
  fn = text.load_lines if kind == "lines" else text.load_table
  fixed = {} if kind == "lines" else {"delimiter": "," if kind == "csv" else "\t"}
  check_options(spec, fn, options, fixed=tuple(fixed))
  return fn(target, seed=seed, **fixed, **options)


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
) -> Dataset:
  """Build a `Dataset` from numpy splits after checking shapes, dtypes, finiteness and label ranges.

  Each split is a `Split` or a tuple `(x, y[, tier[, source_index[, group]]])` with x (N, ...) and y (N,).
  `num_classes=None` infers it: 0 (regression) for float targets, else `max(y) + 1`. Integer targets
  become int32 class ids, float targets float32, features float32, tiers and groups int32 (default
  all clean; no group means all real). Groups index `group_names`, e.g. ("real", "synthetic").
  With `check_disjoint`, splits that all carry `source_index` must not share an index.
  """
  raw = {name_: _as_tuple(name_, s) for name_, s in zip(SPLITS, (train, val, test))}
  ys = [np.asarray(r[1]) for r in raw.values()]
  regression = all(np.issubdtype(y.dtype, np.floating) for y in ys)
  if num_classes is None:
    num_classes = 0 if regression else int(max(int(y.max(initial=-1)) for y in ys)) + 1
  check_int("num_classes", num_classes, minimum=0)
  if num_classes == 0 and not regression:
    raise ValueError("num_classes=0 means regression and needs float targets y; got integer targets")
  splits = {
      split: _check_split(split, *r, num_classes=num_classes, num_tiers=len(tier_names), num_groups=len(group_names))
      for split, r in raw.items()
  }
  shapes = {split: s.x.shape[1:] for split, s in splits.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"splits disagree in feature shape: {shapes}; expected one shape (without the batch axis)")
  num_features = int(np.prod(shapes["train"]))
  if feature_names is None:
    feature_names = tuple(f"x{i}" for i in range(num_features))
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
      **splits,
  )


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
    split, x, y, tier, source_index, group, *, num_classes: int, num_tiers: int, num_groups: int
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
  x = x.astype(np.float32)
  bad = ~np.isfinite(x.reshape(n, -1)).all(axis=1)
  if bad.any():
    raise ValueError(
        f"{split} x has {int(bad.sum())} rows with NaN or inf features (first: row {int(np.argmax(bad))});"
        " expected finite values"
    )
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


def keyword_options(fn: Callable) -> list[str]:
  """Names of the keyword-only parameters of the loader `fn`, except `seed`."""
  parameters = inspect.signature(fn).parameters.values()
  return [p.name for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name != "seed"]


def check_options(spec: str, fn: Callable, options: Mapping[str, Any], *, fixed: Sequence[str] = ()) -> None:
  """Raise if `options` holds a name that the loader `fn` does not accept (listing the accepted ones)."""
  accepted = [name for name in keyword_options(fn) if name not in fixed]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for {spec!r}; accepted: {', '.join(accepted)}")


def check_seed(seed: Any) -> None:
  """Raise unless `seed` is a non-negative int."""
  check_int("seed", seed, minimum=0)


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
  """Raise unless `value` is an int (not bool) of at least `minimum` (or None when allowed)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def check_float(name: str, value: Any, *, minimum: float = 0.0, maximum: float = np.inf) -> None:
  """Raise unless `value` is a finite real number in [minimum, maximum]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not minimum <= value <= maximum:
    raise ValueError(f"{name} must be a number in [{minimum}, {maximum}], got {value!r}")


def check_range(name: str, value: Any, *, minimum: float = 0.0) -> None:
  """Raise unless `value` is a pair (low, high) of numbers with minimum <= low <= high."""
  ok = isinstance(value, (tuple, list)) and len(value) == 2
  ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in value)
  if not ok or not minimum <= value[0] <= value[1]:
    raise ValueError(f"{name} must be a pair (low, high) with {minimum} <= low <= high, got {value!r}")


def check_fractions(name: str, value: Any, known: Sequence[str]) -> dict[str, float]:
  """A validated mapping of known names to fractions in [0, 1] that add up to at most 1."""
  if not isinstance(value, Mapping):
    raise ValueError(f"{name} must be a mapping of tier name to fraction, got {value!r}")
  unknown = sorted(set(value) - set(known))
  if unknown:
    raise ValueError(f"unknown {name} {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
  for key, fraction in value.items():
    check_float(f"{name}[{key!r}]", fraction, maximum=1.0)
  if sum(value.values()) > 1.0 + 1e-9:
    raise ValueError(f"{name} fractions add up to {sum(value.values()):.3f}; expected at most 1")
  return {key: float(value.get(key, 0.0)) for key in known}
