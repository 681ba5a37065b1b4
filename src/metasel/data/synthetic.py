"""Generated datasets that need no download: noisy sine regression and real+synthetic mixtures.

Mixtures record each sample's true quality tier, so a selection method can be scored directly
(e.g. AUC of learned weights against clean/corrupt), and its group (real 0, synthetic 1), so it can
be scored per origin. In a mixture's train split the real rows come first, then the synthetic rows
(shuffled); `val` and `test` hold clean real data only. `corrupted_mixture` makes such a mixture out
of any clean classification dataset, and `label_noise` flips a fraction of any such dataset's training labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from metasel import checks, extras
from metasel.data import arrays
from metasel.data.dataset import CLEAN_TIER, MIXED_GROUPS, REAL_GROUP, SYNTHETIC_GROUP, Dataset
from metasel.data.text import PAD_ID, SPECIAL_TOKENS

MIXTURE_TIERS = ("clean", "label_noise", "feature_shift", "near_duplicate", "pure_noise")
DIGITS_TIERS = ("clean", "pixel_noise", "blur", "shift", "label_flip")
CORRUPTED_TIERS = ("clean", "label_noise", "feature_noise", "near_duplicate", "pure_noise")
DEFAULT_MIXTURE_TIERS = {"label_noise": 0.2, "feature_shift": 0.15, "near_duplicate": 0.1, "pure_noise": 0.15}
DEFAULT_DIGITS_TIERS = {"pixel_noise": 0.15, "blur": 0.15, "shift": 0.15, "label_flip": 0.15}
DEFAULT_CORRUPTED_TIERS = {"label_noise": 0.2, "feature_noise": 0.1, "near_duplicate": 0.1, "pure_noise": 0.1}
CORRUPTED_NOISE_SCALE = 3.0  # feature_noise std, in units of each feature column's train std
CORRUPTED_DUPLICATE_SOURCES = 10  # near_duplicate rows are copies of this many rows
CORRUPTED_DUPLICATE_JITTER = 0.01  # near_duplicate noise std, in units of each feature column's train std
CORRUPTED_TOKEN_NOISE = 0.3  # feature_noise on token rows replaces this fraction of each row's tokens (at least one)
CORRUPTED_DUPLICATE_EDITS = (1, 2)  # (fewest, most) tokens a near_duplicate token row replaces in its source


def sine(
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 200,
    n_test: int = 200,
    noise: float = 0.1,
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> Dataset:
  """Noisy sine regression (the DVN paper's synthetic task): x ~ U(x_range), y = sin(x) + N(0, noise^2).

  All three splits come from the same distribution (noisy targets) and all samples are clean.
  x is (N, 1) float32, y (N,) float32.
  """
  checks.check_seed(seed)
  for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
    checks.check_int(name, n)
  checks.check_float("noise", noise)
  if not (isinstance(x_range, (tuple, list)) and len(x_range) == 2 and x_range[0] < x_range[1]):
    raise ValueError(f"x_range must be a pair (low, high) with low < high, got {x_range!r}")
  rng = np.random.default_rng(seed)
  n = n_train + n_val + n_test
  x = rng.uniform(*x_range, size=(n, 1))  # (N, 1)
  y = np.sin(x[:, 0]) + noise * rng.normal(size=n)  # (N,)
  idx = np.arange(n)
  cuts = np.cumsum([n_train, n_val])
  parts = [(x[s], y[s], None, idx[s]) for s in np.split(idx, cuts)]
  return arrays.from_arrays(*parts, name="sine", num_classes=0, feature_names=("x",))


def mixture(
    *,
    seed: int = 0,
    n_real: int = 400,
    n_synthetic: int = 1600,
    n_val: int = 200,
    n_test: int = 1000,
    num_classes: int = 4,
    dim: int = 32,
    separation: float = 2.5,
    tiers: Mapping[str, float] | None = None,
    shift: float = 0.7,
    duplicate_sources: int = 10,
    duplicate_jitter: float = 0.01,
    noise_scale: float = 3.0,
) -> Dataset:
  """Gaussian class clusters: a small clean real part plus a larger synthetic part with known corruption tiers.

  Class c has mean `separation * u_c` (u_c a random unit vector in `dim` dimensions) and identity
  covariance. `tiers` maps a corruption to its fraction of the synthetic part (the rest is clean,
  tier 0); default `DEFAULT_MIXTURE_TIERS` (60% corrupted). The corruptions:
    label_noise     the label is flipped to another class;
    feature_shift   x moves `shift` of the way toward another class's mean, label kept;
    near_duplicate  tiny jitter (std `duplicate_jitter`) copies of `duplicate_sources` synthetic points;
    pure_noise      x ~ N(0, noise_scale^2 I), label uniform at random.
  Train is the n_real real rows (group 0) followed by the n_synthetic synthetic rows (group 1); val and
  test are clean real data.
  """
  checks.check_seed(seed)
  for name, n in (("n_real", n_real), ("n_val", n_val), ("n_test", n_test), ("dim", dim)):
    checks.check_int(name, n)
  checks.check_int("n_synthetic", n_synthetic, minimum=0)
  checks.check_int("num_classes", num_classes, minimum=2)
  checks.check_int("duplicate_sources", duplicate_sources)
  for name, v in (("separation", separation), ("duplicate_jitter", duplicate_jitter), ("noise_scale", noise_scale)):
    checks.check_float(name, v)
  checks.check_float("shift", shift, maximum=1.0)
  fractions = checks.check_fractions("tiers", DEFAULT_MIXTURE_TIERS if tiers is None else tiers, MIXTURE_TIERS[1:])
  for name, n in (("n_real", n_real), ("n_val", n_val), ("n_test", n_test)):
    if n < num_classes:
      raise ValueError(f"{name}={n} is smaller than num_classes={num_classes}; expected every class present")

  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(num_classes, dim))
  means = separation * directions / np.linalg.norm(directions, axis=1, keepdims=True)  # (C, D)

  def clean(n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.permutation(np.arange(n) % num_classes)  # balanced classes in random order
    return means[y] + rng.normal(size=(n, dim)), y

  real_x, real_y = clean(n_real)
  val_x, val_y = clean(n_val)
  test_x, test_y = clean(n_test)

  counts = arrays.tier_counts(list(fractions.values()), n_synthetic)
  tier = np.repeat(np.arange(len(MIXTURE_TIERS)), np.concatenate([[n_synthetic - counts.sum()], counts]))
  syn_x, syn_y = clean(n_synthetic)
  other = (syn_y + rng.integers(1, num_classes, n_synthetic)) % num_classes  # a class != y, uniform

  flip = tier == MIXTURE_TIERS.index("label_noise")
  syn_y = np.where(flip, other, syn_y)
  moved = tier == MIXTURE_TIERS.index("feature_shift")
  syn_x[moved] += shift * (means[other[moved]] - means[syn_y[moved]])
  dup = np.flatnonzero(tier == MIXTURE_TIERS.index("near_duplicate"))
  if dup.size:
    src = dup[np.arange(dup.size) % min(duplicate_sources, dup.size)]  # the first rows' clean points as prototypes
    syn_x[dup] = syn_x[src] + duplicate_jitter * rng.normal(size=(dup.size, dim))
    syn_y[dup] = syn_y[src]
  noise = tier == MIXTURE_TIERS.index("pure_noise")
  syn_x[noise] = noise_scale * rng.normal(size=(int(noise.sum()), dim))
  syn_y[noise] = rng.integers(0, num_classes, int(noise.sum()))

  order = rng.permutation(n_synthetic)
  train_x = np.concatenate([real_x, syn_x[order]])
  train_y = np.concatenate([real_y, syn_y[order]])
  train_tier = np.concatenate([np.zeros(n_real, int), tier[order]])
  train_group = np.repeat([REAL_GROUP, SYNTHETIC_GROUP], [n_real, n_synthetic])
  # Source rows: one generated pool ordered real, synthetic, val, test.
  n_train = n_real + n_synthetic
  train_src = np.concatenate([np.arange(n_real), n_real + order])
  val_src = n_train + np.arange(n_val)
  test_src = n_train + n_val + np.arange(n_test)
  return arrays.from_arrays(
      (train_x, train_y, train_tier, train_src, train_group),
      (val_x, val_y, None, val_src, np.full(n_val, REAL_GROUP)),
      (test_x, test_y, None, test_src, np.full(n_test, REAL_GROUP)),
      name="mixture",
      num_classes=num_classes,
      feature_names=tuple(f"x{i}" for i in range(dim)),
      tier_names=MIXTURE_TIERS,
      class_names=tuple(f"class{c}" for c in range(num_classes)),
      group_names=MIXED_GROUPS,
  )


def digits_synthetic(
    *,
    seed: int = 0,
    n_real: int = 400,
    n_synthetic: int = 1000,
    n_val: int = 200,
    n_test: int = 400,
    tiers: Mapping[str, float] | None = None,
    noise_std: tuple[float, float] = (0.2, 0.6),
    blur_sigma: tuple[float, float] = (0.8, 1.6),
    max_shift: int = 2,
    flatten: bool = False,
) -> Dataset:
  """scikit-learn's 8x8 digits: real train digits plus synthetic digits corrupted at random strengths.

  Val, test, the real train part and the pool the synthetic part is made from are disjoint sets of
  real digits (stratified by class); synthetic samples cycle through that pool, so a pool image may be
  used more than once. `tiers` maps a corruption to its fraction of the synthetic part (the rest are
  unchanged pool digits, tier 0); default `DEFAULT_DIGITS_TIERS`. The corruptions, each with a strength
  drawn uniformly per sample:
    pixel_noise  add N(0, s^2) per pixel, s in `noise_std`, then clip to [0, 1];
    blur         Gaussian blur with sigma in `blur_sigma`;
    shift        translate by 1..`max_shift` pixels along each axis (zero fill);
    label_flip   the label is replaced by another class, image unchanged.
  x is float32 in [0, 1], (N, 8, 8, 1), or (N, 64) with `flatten=True`; `source_index` is the row in
  `sklearn.datasets.load_digits()` the sample (or its clean original) came from. Train is the real
  rows (group 0) followed by the synthetic rows (group 1).
  """
  checks.check_seed(seed)
  for name, n in (("n_real", n_real), ("n_val", n_val), ("n_test", n_test), ("max_shift", max_shift)):
    checks.check_int(name, n)
  checks.check_int("n_synthetic", n_synthetic, minimum=0)
  checks.check_range("noise_std", noise_std)
  checks.check_range("blur_sigma", blur_sigma, minimum=1e-3)
  if not isinstance(flatten, bool):
    raise ValueError(f"flatten must be True or False, got {flatten!r}")
  fractions = checks.check_fractions("tiers", DEFAULT_DIGITS_TIERS if tiers is None else tiers, DIGITS_TIERS[1:])
  digits = extras.load("sklearn.datasets", needed_by="the digits datasets").load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
  labels = digits.target.astype(np.int32)

  rng = np.random.default_rng(seed)
  sizes = [n_real, n_val, n_test] + ([None] if n_synthetic else [])  # None: all digits left, the synthetic pool
  names = ["n_real", "n_val", "n_test", "the synthetic part's source pool"]
  real, val, test, *rest = arrays.stratified_subsets(labels, sizes, rng, names=names)
  pool = rest[0] if rest else np.empty(0, int)
  counts = arrays.tier_counts(list(fractions.values()), n_synthetic)
  tier = np.repeat(np.arange(len(DIGITS_TIERS)), np.concatenate([[n_synthetic - counts.sum()], counts]))
  tier = rng.permutation(tier)
  src = rng.permutation(pool)[np.arange(n_synthetic) % len(pool)] if n_synthetic else np.empty(0, int)
  syn_x = images[src]
  syn_y = labels[src]

  noisy = tier == DIGITS_TIERS.index("pixel_noise")
  syn_x[noisy] = _pixel_noise(syn_x[noisy], rng.uniform(*noise_std, int(noisy.sum())), rng)
  blurred = tier == DIGITS_TIERS.index("blur")
  syn_x[blurred] = _blur(syn_x[blurred], rng.uniform(*blur_sigma, int(blurred.sum())))
  moved = tier == DIGITS_TIERS.index("shift")
  steps = rng.integers(1, max_shift + 1, (int(moved.sum()), 2)) * rng.choice([-1, 1], (int(moved.sum()), 2))
  syn_x[moved] = _translate(syn_x[moved], steps)
  flip = tier == DIGITS_TIERS.index("label_flip")
  syn_y[flip] = (syn_y[flip] + rng.integers(1, 10, int(flip.sum()))) % 10

  def shaped(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) if flatten else x[..., None]

  real = rng.permutation(real)
  return arrays.from_arrays(
      (
          shaped(np.concatenate([images[real], syn_x])),
          np.concatenate([labels[real], syn_y]),
          np.concatenate([np.zeros(len(real), int), tier]),
          np.concatenate([real, src]),
          np.repeat([REAL_GROUP, SYNTHETIC_GROUP], [len(real), n_synthetic]),
      ),
      (shaped(images[val]), labels[val], None, val, np.full(len(val), REAL_GROUP)),
      (shaped(images[test]), labels[test], None, test, np.full(len(test), REAL_GROUP)),
      name="digits-synthetic",
      num_classes=10,
      feature_names=tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)),
      tier_names=DIGITS_TIERS,
      class_names=tuple(str(c) for c in range(10)),
      group_names=MIXED_GROUPS,
  )


def check_corrupted_options(
    *, n_real: int | None = None, n_synthetic: int | None = None, tiers: Mapping[str, float] | None = None
) -> dict[str, float]:
  """Validate `corrupted_mixture`'s options before any data is loaded; returns the fraction of every corruption."""
  for name, value in (("n_real", n_real), ("n_synthetic", n_synthetic)):
    if value is None:
      raise ValueError(
          f"a corrupted: dataset needs the option {name} (how many {name[2:]} training rows), got none; e.g."
          f" {name}=300 (on the command line: --set dataset_options.{name}=300)"
      )
    checks.check_int(name, value)
  return checks.check_fractions("tiers", DEFAULT_CORRUPTED_TIERS if tiers is None else tiers, CORRUPTED_TIERS[1:])


def corrupted_mixture(
    real: Dataset,
    *,
    n_real: int,
    n_synthetic: int,
    tiers: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Dataset:
  """A real+synthetic mixture with known tiers made from a clean classification dataset, e.g. TF-IDF AG News.

  Val and test stay as they are. Train is `n_real` class-stratified real rows (group 0, tier 0) followed
  by `n_synthetic` synthetic rows (group 1, shuffled) made from the other clean real train rows, which
  cycle when there are fewer of them than `n_synthetic`. `tiers` maps a corruption to its fraction of
  the synthetic part (the rest are unchanged copies, tier 0); default `DEFAULT_CORRUPTED_TIERS` (half
  corrupted). The corruptions work on any feature vectors (images are flattened and shaped back):
    label_noise     the label is replaced by another class, features unchanged;
    feature_noise   Gaussian noise of std `CORRUPTED_NOISE_SCALE` times each feature column's train std;
    near_duplicate  copies of `CORRUPTED_DUPLICATE_SOURCES` rows, with noise of std
                    `CORRUPTED_DUPLICATE_JITTER` times each column's train std;
    pure_noise      each feature column an independent random permutation of that column over the
                    synthetic part's source rows, which keeps every column's values but breaks up
                    the rows; the label uniform at random.
  On token datasets (`real.is_tokens`) the same tiers edit token ids, never creating <pad> or <unk>:
    feature_noise   `CORRUPTED_TOKEN_NOISE` of each row's tokens (at least one) become other random words;
    near_duplicate  copies of `CORRUPTED_DUPLICATE_SOURCES` rows with 1 or 2 tokens (`CORRUPTED_DUPLICATE_EDITS`)
                    replaced by other random words;
    pure_noise      random words, as many as a random length within the source rows' lengths, then padding.
  `source_index` is the input train row each sample was made from (for pure_noise, the row it
  replaces), in `real`'s numbering: its `train.source_index` when recorded, else the row position.
  Only rows of `real.train` that are clean and real are used, so a generated mixture works too.
  """
  if not isinstance(real, Dataset):
    raise ValueError(f"real must be a Dataset (e.g. from load(...)), got {type(real).__name__}")
  checks.check_seed(seed)
  fractions = check_corrupted_options(n_real=n_real, n_synthetic=n_synthetic, tiers=tiers)
  if real.task != "classification":
    raise ValueError(f"corrupted_mixture needs a classification dataset; {real.name!r} is regression (num_classes=0)")
  for split in ("val", "test"):
    s = getattr(real, split)
    bad = int((~s.is_clean | (s.groups != REAL_GROUP)).sum())
    if bad:
      raise ValueError(
          f"{real.name!r} {split} split holds {bad} corrupted or synthetic samples; expected clean real val and test"
      )
  pool = np.flatnonzero(real.train.is_clean & (real.train.groups == REAL_GROUP))
  if n_real >= len(pool):
    raise ValueError(
        f"n_real={n_real} leaves none of the {len(pool)} clean real train rows of {real.name!r} to make the"
        f" synthetic part from; expected n_real < {len(pool)} (load more train rows, e.g. a larger n_train)"
    )
  if real.is_tokens and len(real.vocabulary) < len(SPECIAL_TOKENS) + 2:
    raise ValueError(
        f"{real.name!r} has a vocabulary of {len(real.vocabulary)} tokens; corrupted_mixture replaces words by"
        f" other words, so expected at least 2 words besides {SPECIAL_TOKENS} (fit the vocabulary on more text)"
    )

  rng = np.random.default_rng(seed)
  num_classes = real.num_classes
  x = real.train.x.reshape(len(real.train), -1)  # (N, F)
  y = real.train.y
  names = ["n_real", "the synthetic part's source pool"]
  kept, rest = (pool[p] for p in arrays.stratified_subsets(y[pool], [n_real, None], rng, names=names))
  kept = rng.permutation(kept)
  counts = arrays.tier_counts(list(fractions.values()), n_synthetic)
  tier = np.repeat(np.arange(len(CORRUPTED_TIERS)), np.concatenate([[n_synthetic - counts.sum()], counts]))
  tier = rng.permutation(tier)
  src = rng.permutation(rest)[np.arange(n_synthetic) % len(rest)]
  syn_x = x[src]
  syn_y = y[src].copy()

  flip = tier == CORRUPTED_TIERS.index("label_noise")
  syn_y[flip] = (syn_y[flip] + rng.integers(1, num_classes, int(flip.sum()))) % num_classes
  dup = np.flatnonzero(tier == CORRUPTED_TIERS.index("near_duplicate"))
  src[dup] = src[dup[np.arange(dup.size) % max(min(CORRUPTED_DUPLICATE_SOURCES, dup.size), 1)]]  # first as prototypes
  if real.is_tokens:
    syn_x = _corrupt_tokens(x, syn_x, src, rest, tier, rng, vocab_size=len(real.vocabulary))
  else:
    syn_x = _corrupt_features(x, syn_x, src, rest, tier, rng)
  syn_y[dup] = y[src[dup]]
  noise = np.flatnonzero(tier == CORRUPTED_TIERS.index("pure_noise"))
  syn_y[noise] = rng.integers(0, num_classes, noise.size)

  rows = np.concatenate([kept, src])
  source = real.train.source_index
  return arrays.from_arrays(
      (
          np.concatenate([x[kept], syn_x]).reshape(len(rows), *real.input_shape),
          np.concatenate([y[kept], syn_y]),
          np.concatenate([np.zeros(n_real, int), tier]),
          rows if source is None else source[rows],
          np.repeat([REAL_GROUP, SYNTHETIC_GROUP], [n_real, n_synthetic]),
      ),
      real.val,
      real.test,
      name=f"corrupted:{real.name}",
      num_classes=num_classes,
      feature_names=real.feature_names,
      tier_names=CORRUPTED_TIERS,
      class_names=real.class_names,
      group_names=MIXED_GROUPS,
      check_disjoint=False,  # train rows are a subset of real's train split, which was checked when it was built
      vocabulary=real.vocabulary,
  )


def _corrupt_features(x, syn_x, src, rest, tier, rng) -> np.ndarray:
  """`corrupted_mixture`'s feature_noise, near_duplicate and pure_noise tiers on feature rows syn_x (S, F).

  `x` (N, F) is the real train split, `src` (S,) each synthetic row's source row (near-duplicates
  already pointing at their prototypes) and `rest` the source pool; returns the corrupted rows.
  """
  std = x.std(axis=0, dtype=np.float64)  # (F,)
  noisy = tier == CORRUPTED_TIERS.index("feature_noise")
  syn_x[noisy] += CORRUPTED_NOISE_SCALE * std * rng.normal(size=(int(noisy.sum()), x.shape[1]))
  dup = np.flatnonzero(tier == CORRUPTED_TIERS.index("near_duplicate"))
  if dup.size:
    syn_x[dup] = x[src[dup]] + CORRUPTED_DUPLICATE_JITTER * std * rng.normal(size=(dup.size, x.shape[1]))
  noise = np.flatnonzero(tier == CORRUPTED_TIERS.index("pure_noise"))
  if noise.size:
    syn_x[noise] = _shuffled_columns(x[rest], noise.size, rng)
  return syn_x


def _corrupt_tokens(x, syn_x, src, rest, tier, rng, *, vocab_size: int) -> np.ndarray:
  """The same tiers as `_corrupt_features` on token id rows syn_x (S, L): words replaced, or random word rows."""
  lengths = (x != PAD_ID).sum(axis=1)  # (N,)
  noisy = np.flatnonzero(tier == CORRUPTED_TIERS.index("feature_noise"))
  edits = np.ceil(CORRUPTED_TOKEN_NOISE * lengths[src[noisy]]).astype(int)
  syn_x[noisy] = _replace_tokens(syn_x[noisy], edits, vocab_size, rng)
  dup = np.flatnonzero(tier == CORRUPTED_TIERS.index("near_duplicate"))
  low, high = CORRUPTED_DUPLICATE_EDITS
  edits = np.minimum(rng.integers(low, high + 1, dup.size), lengths[src[dup]])
  syn_x[dup] = _replace_tokens(x[src[dup]], edits, vocab_size, rng)
  noise = np.flatnonzero(tier == CORRUPTED_TIERS.index("pure_noise"))
  shortest, longest = max(int(lengths[rest].min()), 1), max(int(lengths[rest].max()), 1)
  syn_x[noise] = _random_token_rows(rng.integers(shortest, longest + 1, noise.size), x.shape[1], vocab_size, rng)
  return syn_x


def _other_words(ids: np.ndarray, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
  """Random word ids (never <pad> or <unk>) shaped like `ids`, each a different word from the one it replaces."""
  first, words = len(SPECIAL_TOKENS), vocab_size - len(SPECIAL_TOKENS)
  own = ids - first  # the word's index among the words; negative for <pad> and <unk>
  other = first + (np.maximum(own, 0) + rng.integers(1, words, ids.shape)) % words  # a word != own
  anyone = first + rng.integers(0, words, ids.shape)
  return np.where(own >= 0, other, anyone)


def _replace_tokens(rows: np.ndarray, edits: np.ndarray, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
  """Token rows (M, L) with `edits` (M,) of each row's non-pad positions, chosen at random, set to other words."""
  real = rows != PAD_ID
  order = np.where(real, rng.random(rows.shape), np.inf).argsort(axis=1).argsort(axis=1)  # random rank, pads last
  chosen = real & (order < edits[:, None])
  return np.where(chosen, _other_words(rows, vocab_size, rng), rows).astype(rows.dtype)


def _random_token_rows(lengths: np.ndarray, width: int, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
  """Rows (M, width) of `lengths` (M,) uniformly random words each, then <pad>."""
  words = len(SPECIAL_TOKENS) + rng.integers(0, vocab_size - len(SPECIAL_TOKENS), (len(lengths), width))
  return np.where(np.arange(width) < lengths[:, None], words, PAD_ID).astype(np.int32)


def _shuffled_columns(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """n rows (n, F), each column an independent random permutation of that column of x (M, F), cycled past M."""
  m, f = x.shape
  order = np.concatenate([np.argsort(rng.random((m, f)), axis=0) for _ in range(-(-n // m))])[:n]  # (n, F)
  return x[order, np.arange(f)]


def _pixel_noise(images: np.ndarray, std: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Add per-image Gaussian pixel noise of std `std` (N,) to images (N, H, W), clipped to [0, 1]."""
  return np.clip(images + std[:, None, None] * rng.normal(size=images.shape), 0.0, 1.0)


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """Separable Gaussian blur of images (N, H, W) with per-image width `sigma` (N,), renormalised at borders."""
  h = images.shape[1]
  d = np.arange(h)[:, None] - np.arange(h)[None, :]  # (H, H)
  kernel = np.exp(-0.5 * (d[None] / sigma[:, None, None]) ** 2)  # (N, H, H)
  kernel /= kernel.sum(axis=2, keepdims=True)
  return np.einsum("nij,njk,nlk->nil", kernel, images, kernel)


def _translate(images: np.ndarray, steps: np.ndarray) -> np.ndarray:
  """Shift images (N, H, W) by integer `steps` (N, 2) rows/columns, filling with zeros."""
  n, h, w = images.shape
  rows = np.arange(h)[None, :] - steps[:, :1]  # (N, H) source row of each output row
  cols = np.arange(w)[None, :] - steps[:, 1:]  # (N, W)
  inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
  out = images[np.arange(n)[:, None, None], np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
  return np.where(inside, out, 0.0).astype(images.dtype)


LABEL_NOISE_TIERS = ("clean", "label_flip")


LABEL_NOISE_KINDS = ("symmetric", "cyclic")


def label_noise(dataset: Dataset, fraction: float, *, seed: int = 0, kind: str = "symmetric", offset: int = 1) -> Dataset:
  """`dataset` with the labels of `fraction` of its training samples flipped to another class.

  Exactly round(fraction * N) training samples, drawn at random, are flipped: with kind "symmetric" to a
  class drawn uniformly from the others, with kind "cyclic" to (y + offset) mod C (the systematic noise
  of layer-aware influence's experiments). They are marked with tier "label_flip". Validation and test
  splits are left clean.
  """
  if dataset.task != "classification":
    raise ValueError(f"label_noise flips class labels; {dataset.name!r} is a regression dataset")
  checks.check_float("fraction", fraction, maximum=1.0)
  checks.check_seed(seed)
  checks.check_choice("kind", kind, LABEL_NOISE_KINDS)
  classes = dataset.num_classes
  if kind == "cyclic":
    checks.check_int("offset", offset, minimum=1, maximum=max(classes - 1, 1))
  if np.any(dataset.train.tier != CLEAN_TIER):
    raise ValueError(f"{dataset.name!r} already has corrupt training samples; expected a clean dataset to corrupt")
  rng = np.random.default_rng(seed)
  train = dataset.train
  flipped = rng.permutation(len(train))[: int(round(fraction * len(train)))]
  y = train.y.copy()
  shift = rng.integers(1, classes, flipped.size) if kind == "symmetric" else offset
  y[flipped] = (y[flipped] + shift) % classes
  tier = np.zeros(len(train), np.int32)
  tier[flipped] = LABEL_NOISE_TIERS.index("label_flip")
  noisy = dataclasses.replace(train, y=y.astype(train.y.dtype), tier=tier)
  described = "flipped" if kind == "symmetric" else f"shifted by {offset}"
  return dataclasses.replace(dataset, name=f"{dataset.name} ({fraction:.0%} labels {described})", train=noisy,
                             tier_names=LABEL_NOISE_TIERS)
