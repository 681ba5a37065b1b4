"""The data layer: loaders are deterministic, splits disjoint, tiers as configured, bad input rejected early."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets

from metasel import data
from metasel.data import readers, sampling, synthetic, text
from metasel_experiments import shared_data

SPLITS = ("train", "val", "test")
SMALL = {
    "sine": {"n_train": 200, "n_val": 50, "n_test": 50},
    "mixture": {"n_real": 100, "n_synthetic": 400, "n_val": 60, "n_test": 80},
    "digits-synthetic": {"n_real": 200, "n_synthetic": 300, "n_val": 100, "n_test": 150},
}


SHARED = shared_data("")
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared text data not found at {SHARED} (set METASEL_SHARED_DATA to its folder)"
)


def _assert_disjoint(ds: data.Dataset) -> None:
  for i, a in enumerate(SPLITS):
    for b in SPLITS[i + 1 :]:
      shared = np.intersect1d(getattr(ds, a).source_index, getattr(ds, b).source_index)
      assert shared.size == 0, f"{a} and {b} share source rows {shared[:5]}"


def _assert_same(a: data.Dataset, b: data.Dataset) -> None:
  for split in SPLITS:
    sa, sb = getattr(a, split), getattr(b, split)
    for field in ("x", "y", "tier", "source_index"):
      np.testing.assert_array_equal(getattr(sa, field), getattr(sb, field), err_msg=f"{split}.{field}")


def _assert_same_split(a: data.Split, b: data.Split) -> None:
  for field in ("x", "y", "tier", "source_index", "groups"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def _write(tmp_path: Path, name: str, content: str) -> Path:
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  return path


def _tiny_csv(tmp_path: Path, rows: int = 60, classes: int = 3) -> Path:
  words = ["alpha", "beta", "gamma", "delta", "omega"]
  lines = ["label,title,body"] + [
      f'{i % classes},"t{i} {words[i % classes]}","body ""{words[i % classes + 1]}"", more\\ntext"' for i in range(rows)
  ]
  return _write(tmp_path, "tiny.csv", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- generated


@pytest.mark.parametrize("spec", list(SMALL))
def test_generated_sets_deterministic_disjoint_and_seeded(spec):
  a = data.load(spec, seed=3, **SMALL[spec])
  _assert_same(a, data.load(spec, seed=3, **SMALL[spec]))
  other = data.load(spec, seed=4, **SMALL[spec])
  assert not np.array_equal(a.train.x, other.train.x)
  _assert_disjoint(a)
  for split in SPLITS:
    s = getattr(a, split)
    assert s.x.dtype == np.float32 and s.tier.dtype == np.int32
    assert s.y.dtype == (np.float32 if a.num_classes == 0 else np.int32)
    assert np.isfinite(s.x).all()


def test_sine_defaults_follow_the_paper():
  ds = data.load("sine")
  assert [len(getattr(ds, s)) for s in SPLITS] == [1000, 200, 200]
  assert ds.train.x.shape == (1000, 1) and ds.train.y.shape == (1000,)
  assert ds.num_classes == 0 and ds.task == "regression" and ds.tier_names == ("clean",)
  assert all(getattr(ds, s).is_clean.all() for s in SPLITS)
  assert -5 <= ds.train.x.min() and ds.train.x.max() <= 5
  residual = ds.train.y - np.sin(ds.train.x[:, 0])
  assert abs(residual.std() - 0.1) < 0.01  # sigma = 0.1 noise on y


def test_mixture_tiers_match_configuration():
  tiers = {"label_noise": 0.25, "feature_shift": 0.1, "near_duplicate": 0.05, "pure_noise": 0.2}
  ds = data.load("mixture", seed=1, n_real=150, n_synthetic=600, n_val=80, n_test=80, tiers=tiers, dim=16)
  assert ds.tier_names == synthetic.MIXTURE_TIERS and ds.num_classes == 4 and ds.input_shape == (16,)
  assert ds.val.is_clean.all() and ds.test.is_clean.all()
  assert ds.train.is_clean[:150].all()  # the real part comes first
  counts = np.bincount(ds.train.tier[150:], minlength=5)
  for name, fraction in tiers.items():
    assert counts[ds.tier_names.index(name)] == round(fraction * 600)
  assert counts[0] == 600 - sum(round(f * 600) for f in tiers.values())

  # Corruptions look like what they claim: flipped labels disagree with the nearest class centre,
  # near-duplicates sit next to each other, pure noise is far from every cluster.
  centres = np.stack([ds.val.x[ds.val.y == c].mean(0) for c in range(4)])
  nearest = np.argmin(((ds.train.x[:, None] - centres) ** 2).sum(-1), axis=1)
  agree = nearest == ds.train.y
  assert agree[ds.train.tier == 0].mean() > 0.8 > 0.2 > agree[ds.train.tier == 1].mean()
  dup = ds.train.x[ds.train.tier == 3]
  gaps = np.sort(((dup[:, None] - dup) ** 2).sum(-1), axis=1)[:, 1]
  assert gaps.max() < 0.01
  norms = np.linalg.norm(ds.train.x, axis=1)
  assert np.median(norms[ds.train.tier == 4]) > 2 * np.median(norms[ds.train.tier == 0])


def test_mixture_default_is_a_few_thousand_samples_with_much_corruption():
  ds = data.load("mixture")
  assert [len(getattr(ds, s)) for s in SPLITS] == [2000, 200, 1000]
  assert set(np.unique(ds.train.tier)) == set(range(5))
  assert 0.3 < 1 - ds.train.is_clean.mean() < 0.6


def test_digits_synthetic_tiers_shapes_and_disjoint_sources():
  ds = data.load("digits-synthetic", seed=2, **SMALL["digits-synthetic"])
  assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10 and ds.tier_names == synthetic.DIGITS_TIERS
  assert 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0
  assert ds.val.is_clean.all() and ds.test.is_clean.all()
  counts = np.bincount(ds.train.tier[200:], minlength=5)
  for name, fraction in synthetic.DEFAULT_DIGITS_TIERS.items():
    assert counts[ds.tier_names.index(name)] == round(fraction * 300)
  for split in ("val", "test"):
    assert np.bincount(getattr(ds, split).y, minlength=10).min() > 0

  digits = sklearn.datasets.load_digits()
  original = digits.images[ds.train.source_index] / 16.0
  changed = np.abs(ds.train.x[..., 0] - original).reshape(len(original), -1).max(1) > 1e-6
  relabelled = ds.train.y != digits.target[ds.train.source_index]
  tier = ds.train.tier
  assert not changed[tier == 0].any() and changed[(tier >= 1) & (tier <= 3)].all() and not changed[tier == 4].any()
  assert relabelled[tier == 4].all() and not relabelled[tier != 4].any()

  flat = data.load("digits-synthetic", seed=2, flatten=True, **SMALL["digits-synthetic"])
  assert flat.input_shape == (64,)
  np.testing.assert_array_equal(flat.train.x, ds.train.x.reshape(-1, 64))


@pytest.mark.parametrize("spec", ["mixture", "digits-synthetic"])
def test_generated_mixtures_mark_real_and_synthetic_groups(spec):
  ds = data.load(spec, seed=1, **SMALL[spec])
  n_real, n_synthetic = SMALL[spec]["n_real"], SMALL[spec]["n_synthetic"]
  assert ds.group_names == ("real", "synthetic")
  assert ds.train.group.dtype == np.int32
  np.testing.assert_array_equal(ds.train.groups, np.repeat([0, 1], [n_real, n_synthetic]))
  assert ds.train.is_clean[ds.train.groups == data.REAL_GROUP].all()
  for split in ("val", "test"):
    assert (getattr(ds, split).groups == data.REAL_GROUP).all()
  sine = data.load("sine", **SMALL["sine"])
  assert sine.group_names == ("real",) and sine.train.group is None
  assert sine.train.groups.dtype == np.int32 and not sine.train.groups.any()


# ---------------------------------------------------------------------------------------------- text files


def test_csv_with_header_quotes_escapes_and_train_only_vocabulary(tmp_path):
  path = _tiny_csv(tmp_path)
  ds = data.load(f"csv:{path}", seed=0, n_train=30, n_val=12, n_test=15)
  assert ds.num_classes == 3 and ds.class_names == ("0", "1", "2")
  assert [len(getattr(ds, s)) for s in SPLITS] == [30, 12, 15]
  assert ds.train.x.dtype == np.float32 and ds.train.x.shape[1] == len(ds.feature_names)
  _assert_disjoint(ds)
  _assert_same(ds, data.load(f"csv:{path}", seed=0, n_train=30, n_val=12, n_test=15))
  assert not np.array_equal(ds.train.source_index, data.load(f"csv:{path}", seed=1, n_train=30).train.source_index)
  # Titles t0..t59 are unique words: only those of train rows can be in the vocabulary.
  titles = {f"t{i}" for i in ds.train.source_index}
  assert {f for f in ds.feature_names if f[0] == "t" and f[1:].isdigit()} <= titles
  labels, texts, _ = readers.read_table(path)
  assert labels[1] == "1" and texts[1] == 't1 beta body "gamma", more\ntext'


def test_tsv_and_numeric_class_order(tmp_path):
  rows = [f"{c}\tword{c} shared text {i}" for i in range(66) for c in [(i % 11) + 1]]  # labels 1..11
  path = _write(tmp_path, "t.tsv", "\n".join(rows))
  ds = data.load(f"tsv:{path}", n_train=22, n_val=11, n_test=11)
  assert ds.class_names == tuple(str(c) for c in range(1, 12))  # "10" after "9"
  word = ds.feature_names.index("word10")
  assert (ds.train.x[ds.train.y == 9, word] > 0).all()


def test_lines_format_strips_quotes_when_asked_and_maps_labels(tmp_path):
  lines = [f'{i % 3} "review {i} good\\nbad ."' if i % 2 else f"{i % 3} review {i} plain" for i in range(60)]
  path = _write(tmp_path, "y.txt", "\n".join(lines) + "\n")
  labels, texts, rows = readers.read_lines(path, strip_quotes=True)
  assert labels[1] == "1" and texts[1] == "review 1 good\nbad ." and texts[0] == "review 0 plain"
  as_written = readers.read_lines(path)[1]  # by default every text is kept as written, quotes included
  assert as_written[1] == '"review 1 good\nbad ."' and as_written[0] == "review 0 plain"
  ds = data.load(f"lines:{path}", label_map={0: 0, 2: 1}, n_train=20, n_val=10, n_test=10)
  assert ds.num_classes == 2 and ds.class_names == ("0", "2")
  kept = np.concatenate([getattr(ds, s).source_index for s in SPLITS])
  assert not np.isin(kept, rows[1::3]).any()  # raw label 1 was dropped
  merged = data.load(f"lines:{path}", label_map={0: 0, 1: 0, 2: 1})
  assert merged.class_names == ("0+1", "2")


@needs_shared
@pytest.mark.parametrize(
    "spec, options, num_classes",
    [
        ("csv:ag_news/test.csv", {}, 4),
        ("csv:dbpedia_14/validation.csv", {}, 14),
        ("lines:yelp_polarity/textfooler_yelp_1k.txt", {"n_train": 600}, 2),
        ("csv:yelp_review_full_subset/test_yelp.csv", {}, 5),
        ("csv:yelp_review_full_subset/test_yelp.csv", {"label_map": {0: 0, 1: 0, 3: 1, 4: 1}}, 2),
    ],
)
def test_shared_text_files_load_with_the_right_classes(spec, options, num_classes):
  kind, _, rel = spec.partition(":")
  sizes = {"n_train": 1000, "n_val": 200, "n_test": 200, **options}
  ds = data.load(f"{kind}:{SHARED / rel}", seed=0, **sizes)
  assert ds.num_classes == num_classes and len(ds.class_names) == num_classes
  assert len(ds.train) == sizes["n_train"] and len(ds.test) == 200
  for split in SPLITS:
    assert np.bincount(getattr(ds, split).y, minlength=num_classes).min() > 0
  assert ds.train.x.shape == (sizes["n_train"], 2000) and ds.train.x.dtype == np.float32
  _assert_disjoint(ds)


@needs_shared
def test_dbpedia_subsample_is_stratified():
  ds = data.load(f"csv:{SHARED / 'dbpedia_14/validation.csv'}", n_train=1400, n_val=140, n_test=280, max_features=100)
  assert np.bincount(ds.train.y).min() >= 95 and np.bincount(ds.test.y).min() >= 18


def test_stratified_subsets_are_disjoint_proportional_and_exact():
  y = np.repeat([0, 1, 2], [500, 300, 200])
  train, val, rest = data.stratified_subsets(y, [100, 30, None], 0)
  assert (len(train), len(val), len(rest)) == (100, 30, 870)
  assert np.bincount(y[train]).tolist() == [50, 30, 20] and np.bincount(y[val]).tolist() == [15, 9, 6]
  assert len(np.unique(np.concatenate([train, val, rest]))) == 1000
  tiny = data.stratified_subsets(y, [3], 1)[0]
  assert sorted(y[tiny].tolist()) == [0, 1, 2]  # every class gets at least one row


# ---------------------------------------------------------------------------------------------- corrupted mixtures


def _clean_blobs(n_train=300, n_val=40, n_test=60, classes=3, dim=6, seed=0) -> data.Dataset:
  """Clean Gaussian classes; source rows start at 1000 so that they differ from train row positions."""
  rng = np.random.default_rng(seed)
  means = 4.0 * rng.normal(size=(classes, dim))
  n = n_train + n_val + n_test
  y = np.arange(n) % classes
  x = means[y] + rng.normal(size=(n, dim))
  rows = 1000 + np.arange(n)
  cuts = np.split(np.arange(n), [n_train, n_train + n_val])
  return data.from_arrays(*[(x[c], y[c], None, rows[c]) for c in cuts], name="blobs")


def test_corrupted_mixture_tiers_groups_and_sources():
  real = _clean_blobs()
  tiers = {"label_noise": 0.2, "feature_noise": 0.15, "near_duplicate": 0.1, "pure_noise": 0.15}
  ds = synthetic.corrupted_mixture(real, n_real=60, n_synthetic=400, tiers=tiers, seed=2)
  assert ds.name == "corrupted:blobs" and ds.tier_names == synthetic.CORRUPTED_TIERS
  assert ds.group_names == ("real", "synthetic") and ds.num_classes == 3 and ds.input_shape == (6,)
  assert [len(getattr(ds, s)) for s in SPLITS] == [460, 40, 60]
  for split in ("val", "test"):
    _assert_same_split(getattr(ds, split), getattr(real, split))
  tr = ds.train
  np.testing.assert_array_equal(tr.groups, np.repeat([0, 1], [60, 400]))
  assert tr.is_clean[:60].all() and np.bincount(tr.y[:60]).tolist() == [20, 20, 20]  # stratified real rows
  counts = np.bincount(tr.tier[60:], minlength=5)
  for name, fraction in tiers.items():
    assert counts[ds.tier_names.index(name)] == round(fraction * 400)
  assert counts[0] == 400 - sum(round(f * 400) for f in tiers.values())

  # source_index is the real train row in the real dataset's numbering; the synthetic part never uses a real row.
  assert np.isin(tr.source_index, real.train.source_index).all()
  assert np.intersect1d(tr.source_index[:60], tr.source_index[60:]).size == 0
  assert len(np.unique(tr.source_index[60:])) > 200  # the 240 other rows, reused cyclically
  row = tr.source_index - 1000
  src_x, src_y = real.train.x[row], real.train.y[row]
  np.testing.assert_array_equal(tr.x[:60], src_x[:60])
  tier = tr.tier
  same = (tr.x == src_x).all(1)
  gap = (np.abs(tr.x - src_x) / real.train.x.std(0)).max(1)  # in units of each column's train std
  assert same[tier == 0].all() and (tr.y == src_y)[tier == 0].all()
  assert same[tier == 1].all() and (tr.y != src_y)[tier == 1].all()
  assert np.median(gap[tier == 2]) > 3 and (tr.y == src_y)[tier == 2].all()
  assert 0 < gap[tier == 3].min() and gap[tier == 3].max() < 0.05 and (tr.y == src_y)[tier == 3].all()
  assert len(np.unique(tr.source_index[tier == 3])) <= synthetic.CORRUPTED_DUPLICATE_SOURCES
  pool = real.train.x[np.setdiff1d(np.arange(300), row[:60])]
  noise = tr.x[tier == 4]
  assert all(np.isin(noise[:, j], pool[:, j]).all() for j in range(6))  # each column permuted from the pool
  assert not (noise[:, None] == pool[None]).all(-1).any()  # but no row survives whole

  _assert_same(ds, synthetic.corrupted_mixture(real, n_real=60, n_synthetic=400, tiers=tiers, seed=2))
  other = synthetic.corrupted_mixture(real, n_real=60, n_synthetic=400, tiers=tiers, seed=3)
  assert not np.array_equal(ds.train.x, other.train.x)
  default = np.bincount(synthetic.corrupted_mixture(real, n_real=30, n_synthetic=200).train.tier[30:], minlength=5)
  assert default[0] == 100 and default[1:].tolist() == [40, 20, 20, 20]


def test_corrupted_mixture_of_a_generated_mixture_uses_its_clean_real_rows():
  # n_real and n_synthetic go to corrupted_mixture, so the inner mixture keeps its defaults (400 real rows).
  mix = data.load("mixture", seed=0, n_val=40, n_test=40, dim=8)
  ds = data.load("corrupted:mixture", seed=0, n_real=40, n_synthetic=800, n_val=40, n_test=40, dim=8)
  assert [len(getattr(ds, s)) for s in SPLITS] == [840, 40, 40] and ds.input_shape == (8,)
  assert np.isin(ds.train.source_index, mix.train.source_index[:400]).all()  # only mixture's real rows
  assert len(np.unique(ds.train.source_index[40:])) > 300


def test_load_corrupted_csv_routes_options(tmp_path):
  path = _tiny_csv(tmp_path)
  options = {"n_train": 36, "n_val": 9, "n_test": 15, "max_features": 8}
  ds = data.load(f"corrupted:csv:{path}", seed=1, n_real=12, n_synthetic=50, **options)
  inner = data.load(f"csv:{path}", seed=1, **options)
  assert ds.name == f"corrupted:csv:{path}" and ds.class_names == inner.class_names
  assert ds.feature_names == inner.feature_names and ds.input_shape == (8,)
  assert [len(getattr(ds, s)) for s in SPLITS] == [62, 9, 15]
  _assert_same_split(ds.test, inner.test)
  assert np.isin(ds.train.source_index, inner.train.source_index).all()
  _assert_disjoint(ds)


@needs_shared
def test_load_corrupted_ag_news():
  spec = f"corrupted:csv:{SHARED / 'ag_news/test.csv'}"
  ds = data.load(spec, seed=0, n_real=100, n_synthetic=300, n_train=400, n_val=100, n_test=100, max_features=500)
  assert ds.num_classes == 4 and ds.train.x.shape == (400, 500) and ds.tier_names == synthetic.CORRUPTED_TIERS
  assert np.bincount(ds.train.groups).tolist() == [100, 300]
  assert np.bincount(ds.train.tier[100:], minlength=5).tolist() == [150, 60, 30, 30, 30]
  for split in SPLITS:
    assert np.bincount(getattr(ds, split).y, minlength=4).min() > 0
  _assert_disjoint(ds)


# ---------------------------------------------------------------------------------------------- tfds


def test_tfds_text_and_image_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=80):
    ds = data.load("tfds:ag_news_subset", seed=0, n_train=40, n_val=12, n_test=20, max_features=64)
    again = data.load("tfds:ag_news_subset", seed=0, n_train=40, n_val=12, n_test=20, max_features=64)
    images = data.load("tfds:mnist", seed=1, n_train=50, n_val=20, n_test=30)
    flat = data.load("tfds:mnist", seed=1, n_train=50, n_val=20, n_test=30, flatten=True)
    one_split = data.load("tfds:mnist", test_split="train", n_train=40, n_test=20)  # val and test carved from train
  assert ds.num_classes == 4 and ds.class_names[0] == "World"
  assert [len(getattr(ds, s)) for s in SPLITS] == [40, 12, 20]
  assert ds.train.x.dtype == np.float32 and ds.train.x.shape[1] == len(ds.feature_names) <= 64
  assert np.intersect1d(ds.train.source_index, ds.val.source_index).size == 0  # val carved from train
  _assert_same(ds, again)
  assert images.num_classes == 10 and images.input_shape == (28, 28, 1) and flat.input_shape == (784,)
  assert images.train.x.dtype == np.float32 and 0 <= images.train.x.min() and images.train.x.max() <= 1
  assert [len(getattr(one_split, s)) for s in SPLITS] == [40, 10, 20]
  _assert_disjoint(one_split)


class _RecordSource:
  """A TFDS data source read one record at a time (no `__getitems__`), counting direct record reads."""

  def __init__(self, source, bad_row: int | None = None):
    self.source, self.bad_row, self.dataset_info = source, bad_row, source.dataset_info
    self.single_reads = 0

  def __len__(self):
    return len(self.source)

  def _record(self, i: int):
    if i == self.bad_row:
      raise OSError("corrupt record")
    return self.source[i]

  def __getitem__(self, i):
    self.single_reads += 1
    return self._record(i)


class _BatchSource(_RecordSource):
  """`_RecordSource` with a `__getitems__` that logs each batch it is asked for.

  The batch is served record by record from the wrapped source: `tfds.testing.mock_data` sources fail on
  `__getitems__` themselves.
  """

  def __init__(self, source, bad_row: int | None = None):
    super().__init__(source, bad_row)
    self.batches = []

  def __getitems__(self, keys):
    self.batches.append(list(keys))
    return [self._record(i) for i in keys]


def _wrap_tfds_sources(monkeypatch, tfds, wrapper, **kwargs) -> list:
  """Make `tfds.data_source` return `wrapper(source, **kwargs)`; the wrapped sources, in opening order."""
  opened, data_source = [], tfds.data_source

  def wrapped(*args, **options):
    opened.append(wrapper(data_source(*args, **options), **kwargs))
    return opened[-1]

  monkeypatch.setattr(tfds, "data_source", wrapped)
  return opened


def test_tfds_batched_read_matches_record_by_record(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  options = dict(seed=1, n_train=30, n_val=10, n_test=20)
  with tfds.testing.mock_data(num_examples=60):
    plain = data.load("tfds:mnist", **options)
    monkeypatch.setattr(text, "TFDS_CHUNK_SIZE", 7)  # 60 rows: eight full chunks and a remainder of 4
    with monkeypatch.context() as patch:
      batched_sources = _wrap_tfds_sources(patch, tfds, _BatchSource)
      batched = data.load("tfds:mnist", **options)
      texts = data.load("tfds:ag_news_subset", seed=0, max_features=64)
    with monkeypatch.context() as patch:
      _wrap_tfds_sources(patch, tfds, _RecordSource)  # no `__getitems__`: read one record at a time
      single = data.load("tfds:mnist", **options)
      single_texts = data.load("tfds:ag_news_subset", seed=0, max_features=64)
    monkeypatch.setattr(text, "TFDS_CHUNK_SIZE", 1)
    unit_chunks = data.load("tfds:mnist", **options)
  assert all(source.batches for source in batched_sources)  # the batched loads really read in batches
  _assert_same(batched, single)
  _assert_same(batched, unit_chunks)
  _assert_same(batched, plain)
  _assert_same(texts, single_texts)


def test_tfds_reads_whole_chunks_through_getitems(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(text, "TFDS_CHUNK_SIZE", 7)
  with tfds.testing.mock_data(num_examples=60):
    sources = _wrap_tfds_sources(monkeypatch, tfds, _BatchSource)
    ds = data.load("tfds:mnist", seed=0, n_train=30, n_val=10, n_test=20)
  chunks = [list(range(s, min(s + 7, 60))) for s in range(0, 60, 7)]
  assert len(sources) == 2  # train (val carved from it) and test, each opened and read once
  for source in sources:
    assert source.batches == chunks
    assert source.single_reads == 0
  assert [len(getattr(ds, s)) for s in SPLITS] == [30, 10, 20]


def test_tfds_unreadable_record_names_split_and_row(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(text, "TFDS_CHUNK_SIZE", 7)
  with tfds.testing.mock_data(num_examples=60):
    for wrapper in (_BatchSource, _RecordSource):
      with monkeypatch.context() as patch, pytest.raises(
          ValueError, match=r"tfds:mnist: row 17 of split 'train' could not be read.*corrupt record"
      ):
        _wrap_tfds_sources(patch, tfds, wrapper, bad_row=17)
        data.load("tfds:mnist", seed=0)


def test_tfds_bad_keys_raise_before_reading():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    with pytest.raises(ValueError, match=r"label_key='topic' is not a feature.*features: \[.*'description'"):
      data.load("tfds:ag_news_subset", label_key="topic")
    with pytest.raises(ValueError, match="text_keys.*'body'"):
      data.load("tfds:ag_news_subset", text_keys=["body"])
    with pytest.raises(ValueError, match="n_train=500.*only 40"):
      data.load("tfds:ag_news_subset", n_train=500)


# ---------------------------------------------------------------------------------------------- from_arrays


def _xy(n=12, classes=3, dim=2):
  rng = np.random.default_rng(0)
  return rng.normal(size=(n, dim)), np.arange(n) % classes


def test_from_arrays_builds_canonical_dtypes():
  x, y = _xy()
  ds = data.from_arrays((x, y), (x, y), (x, y, np.zeros(12, int)), name="mine")
  assert ds.num_classes == 3 and ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
  assert ds.feature_names == ("x0", "x1") and ds.train.is_clean.all()
  reg = data.from_arrays((x, x[:, 0]), (x, x[:, 0]), (x, x[:, 0]))
  assert reg.task == "regression" and reg.train.y.dtype == np.float32


@pytest.mark.parametrize(
    "train, match",
    [
        (lambda x, y: (np.where(np.arange(12)[:, None] == 4, np.nan, x), y), "NaN or inf.*row 4"),
        (lambda x, y: (np.where(np.arange(12)[:, None] == 2, np.inf, x), y), "NaN or inf.*row 2"),
        (lambda x, y: (x, y[:10]), r"train y has shape \(10,\) but x has 12 rows"),
        (lambda x, y: (x[:, 0], y), r"train x has shape \(12,\)"),
        (lambda x, y: (x, y.astype(float)), "dtype float64; expected integer"),
        (lambda x, y: (x, np.where(y == 2, 0, y)), r"no samples of class \[2\]"),
        (lambda x, y: (x, y, np.full(12, 5)), r"tier has values in \[5, 5\]"),
        (lambda x, y: (x, y, None, np.arange(12)), "share 12 source rows"),
    ],
)
def test_from_arrays_rejects_bad_arrays(train, match):
  x, y = _xy()
  val = (x, y, None, np.arange(12))
  with pytest.raises(ValueError, match=match):
    data.from_arrays(train(x, y), val, (x, y), num_classes=3)


def test_from_arrays_carries_groups():
  x, y = _xy()
  group = np.arange(12) % 2
  ds = data.from_arrays((x, y, None, None, group), (x, y), (x, y), group_names=("real", "synthetic"))
  assert ds.group_names == ("real", "synthetic") and ds.train.group.dtype == np.int32
  np.testing.assert_array_equal(ds.train.groups, group)
  assert ds.val.group is None and not ds.val.groups.any()
  again = data.from_arrays(ds.train, ds.val, ds.test, group_names=ds.group_names)
  np.testing.assert_array_equal(again.train.group, group)
  assert data.from_arrays((x, y), (x, y), (x, y)).group_names == ("real",)
  with pytest.raises(ValueError, match=r"train group has values in \[0, 1\]; expected 0..0 \(group_names\)"):
    data.from_arrays((x, y, None, None, group), (x, y), (x, y))
  with pytest.raises(ValueError, match=r"val group has shape \(5,\)"):
    data.from_arrays((x, y), (x, y, None, None, group[:5]), (x, y))
  with pytest.raises(ValueError, match="group_names must start with 'real'"):
    data.from_arrays((x, y), (x, y), (x, y), group_names=("synthetic",))
  with pytest.raises(ValueError, match="split group has 5 entries but x has 12 rows"):
    data.Split(x, y, np.zeros(12, np.int32), None, group[:5])


# ---------------------------------------------------------------------------------------------- bad input


def test_load_rejects_bad_specs_and_options(tmp_path):
  with pytest.raises(ValueError, match=r"unknown dataset spec 'cifar'.*sine, mixture, digits-synthetic, csv:PATH"):
    data.load("cifar")
  with pytest.raises(ValueError, match=r"unknown option\(s\) 'n_samples' for 'sine'; accepted: n_train, n_val"):
    data.load("sine", n_samples=5)
  with pytest.raises(ValueError, match=r"'label_column'.*for 'lines:.*accepted: label_map, n_train"):
    data.load(f"lines:{tmp_path / 'x.txt'}", label_column=0)
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    data.load(f"csv:{tmp_path / 'nope.csv'}")
  with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
    data.load("mixture", seed=-1)
  with pytest.raises(ValueError, match="noise must be a number in .*got -0.5"):
    data.load("sine", noise=-0.5)
  with pytest.raises(ValueError, match=r"unknown tiers 'blur'; expected some of label_noise"):
    data.load("mixture", tiers={"blur": 0.1})
  with pytest.raises(ValueError, match="tiers fractions add up to 1.200"):
    data.load("mixture", tiers={"label_noise": 0.7, "pure_noise": 0.5})
  with pytest.raises(ValueError, match="n_real=2 is smaller than num_classes=4"):
    data.load("mixture", n_real=2)
  with pytest.raises(ValueError, match=r"add up to 2000 rows, but only 1797"):
    data.load("digits-synthetic", n_real=1500, n_val=200, n_test=300)


def test_text_loaders_reject_bad_columns_sizes_and_maps(tmp_path):
  path = _tiny_csv(tmp_path)
  with pytest.raises(ValueError, match=r"label_column='stars' is not a column.*columns: \['label', 'title', 'body'\]"):
    data.load(f"csv:{path}", label_column="stars")
  with pytest.raises(ValueError, match=r"label_column=7 is not a column"):
    data.load(f"csv:{path}", label_column=7)
  with pytest.raises(ValueError, match=r"text_columns='summary' is not a column"):
    data.load(f"csv:{path}", text_columns=["title", "summary"])
  with pytest.raises(ValueError, match="header must be True, False or 'infer', got 'yes'"):
    data.load(f"csv:{path}", header="yes")
  with pytest.raises(ValueError, match=r"n_train=50, n_val=10, n_test=10\) add up to 70 rows, but only 60"):
    data.load(f"csv:{path}", n_train=50, n_val=10, n_test=10)
  with pytest.raises(ValueError, match="n_test would have no rows of class 2 "):
    data.load(f"csv:{path}", n_train=10, n_val=5, n_test=2)
  with pytest.raises(ValueError, match="label_map .* leaves class 1 with no samples"):
    data.load(f"csv:{path}", label_map={0: 0, 1: 2, 2: 2})
  with pytest.raises(ValueError, match=r"label_map keys \['7'\] do not occur.*present: \['0', '1', '2'\]"):
    data.load(f"csv:{path}", label_map={0: 0, 7: 1})
  with pytest.raises(ValueError, match="max_features must be an integer >= 1, got 0"):
    data.load(f"csv:{path}", max_features=0)


def test_named_column_of_a_headerless_file_is_rejected(tmp_path):
  path = tmp_path / "plain.csv"
  path.write_text("".join(f'{i % 2},"text number {i}"\n' for i in range(20)))
  with pytest.raises(ValueError, match="label_column='label' names a column but .* is read without a header"):
    data.load(f"csv:{path}", label_column="label")


def test_corrupted_mixture_rejects_bad_input(tmp_path):
  real = _clean_blobs(n_train=60)
  sine = data.load("sine", **SMALL["sine"])
  with pytest.raises(ValueError, match=r"needs a classification dataset; 'sine' is regression"):
    synthetic.corrupted_mixture(sine, n_real=10, n_synthetic=10)
  with pytest.raises(ValueError, match=r"needs a classification dataset; 'sine' is regression"):
    data.load("corrupted:sine", n_real=10, n_synthetic=10, **SMALL["sine"])
  with pytest.raises(ValueError, match=r"n_real=60 leaves none of the 60 clean real train rows of 'blobs'"):
    synthetic.corrupted_mixture(real, n_real=60, n_synthetic=10)
  with pytest.raises(ValueError, match=r"n_real would have no rows of class 2"):
    synthetic.corrupted_mixture(real, n_real=2, n_synthetic=10)
  with pytest.raises(ValueError, match=r"unknown tiers 'blur'; expected some of label_noise, feature_noise"):
    synthetic.corrupted_mixture(real, n_real=10, n_synthetic=10, tiers={"blur": 0.1})
  with pytest.raises(ValueError, match="n_synthetic must be an integer >= 1, got 0"):
    synthetic.corrupted_mixture(real, n_real=10, n_synthetic=0)
  with pytest.raises(ValueError, match="real must be a Dataset"):
    synthetic.corrupted_mixture(real.train, n_real=10, n_synthetic=10)
  mix = data.load("mixture", **SMALL["mixture"])
  with pytest.raises(ValueError, match="val split holds 400 corrupted or synthetic samples"):
    synthetic.corrupted_mixture(dataclasses.replace(mix, val=mix.train), n_real=10, n_synthetic=10)

  path = _tiny_csv(tmp_path)
  with pytest.raises(ValueError, match=r"unknown option\(s\) 'noise' for 'csv:.*accepted: label_column"):
    data.load(f"corrupted:csv:{path}", n_real=10, n_synthetic=10, noise=0.5)
  with pytest.raises(ValueError, match=r"n_real=30 leaves none of the 30 clean real train rows"):
    data.load(f"corrupted:csv:{path}", n_real=30, n_synthetic=10, n_train=30)
  with pytest.raises(ValueError, match=r"needs the option n_real .*--set dataset_options.n_real=300"):
    data.load(f"corrupted:csv:{path}", n_synthetic=10)
  with pytest.raises(ValueError, match=r"unknown dataset spec 'cifar'; known specs: .*corrupted:SPEC"):
    data.load("corrupted:cifar", n_real=10, n_synthetic=10)
  with pytest.raises(ValueError, match=r"'corrupted:' names no dataset to corrupt"):
    data.load("corrupted:", n_real=10, n_synthetic=10)


# ---------------------------------------------------------------------------------------------- sampling


def test_epoch_batches_is_a_permutation():
  key = jax.random.key(0)
  batches = sampling.epoch_batches(key, 103, 10)
  assert batches.shape == (10, 10) and batches.dtype == jnp.int32
  flat = np.asarray(batches).ravel()
  assert len(set(flat)) == 100 and flat.min() >= 0 and flat.max() < 103
  full = np.asarray(sampling.epoch_batches(key, 103, 10, drop_last=False))
  assert full.shape == (11, 10) and set(full.ravel()) == set(range(103))
  np.testing.assert_array_equal(batches, sampling.epoch_batches(key, 103, 10))
  assert not np.array_equal(batches, sampling.epoch_batches(jax.random.key(1), 103, 10))
  jitted = jax.jit(sampling.epoch_batches, static_argnums=(1, 2))
  np.testing.assert_array_equal(jitted(key, 103, 10), batches)


def test_weighted_batches_follow_probs():
  key = jax.random.key(1)
  probs = jnp.array([0.0, 1.0, 2.0, 0.0, 5.0, 2.0])  # unnormalised
  draws = sampling.weighted_batches(key, probs, 64, 500)
  assert draws.shape == (500, 64) and draws.dtype == jnp.int32
  freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / draws.size
  np.testing.assert_allclose(freq, np.asarray(probs) / 10.0, atol=0.01)
  assert freq[0] == 0 and freq[3] == 0

  distinct = np.asarray(sampling.weighted_batches(key, probs, 4, 300, replace=False))
  assert all(len(set(row)) == 4 for row in distinct) and not np.isin(distinct, [0, 3]).any()
  first = np.bincount(distinct[:, 0], minlength=6) / 300  # the first pick of Gumbel top-k follows probs
  np.testing.assert_allclose(first, np.asarray(probs) / 10.0, atol=0.08)

  fn = jax.jit(sampling.weighted_batches, static_argnums=(2, 3), static_argnames="replace")
  np.testing.assert_array_equal(fn(key, probs, 64, 500), draws)
  np.testing.assert_array_equal(fn(key, probs, 4, 300, replace=False), distinct)
  np.testing.assert_array_equal(sampling.weighted_batches(key, probs, 64, 500), draws)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sampling.epoch_batches(jax.random.key(0), 10, 11), "batch_size=11 is larger than num_samples=10"),
        (lambda: sampling.epoch_batches(jax.random.key(0), 10, 0), r"batch_size must be an integer >= 1, got 0"),
        (
            lambda: sampling.weighted_batches(jax.random.key(0), jnp.ones(5), 6, 2, replace=False),
            "batch_size=6 is larger .* N=5",
        ),
        (lambda: sampling.weighted_batches(jax.random.key(0), jnp.array([1.0, -1.0]), 1, 2), "negative entries"),
        (lambda: sampling.weighted_batches(jax.random.key(0), jnp.array([1.0, jnp.nan]), 1, 2), "NaN or inf"),
        (lambda: sampling.weighted_batches(jax.random.key(0), jnp.zeros(3), 1, 2), "all zero"),
        (lambda: sampling.weighted_batches(jax.random.key(0), jnp.ones((2, 3)), 1, 2), r"shape \(N,\).*\(2, 3\)"),
        (
            lambda: sampling.weighted_batches(jax.random.key(0), jnp.array([1.0, 0.0, 0.0]), 2, 1, replace=False),
            "only 1 indices have positive probability but batch_size=2",
        ),
    ],
)
def test_sampling_rejects_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
