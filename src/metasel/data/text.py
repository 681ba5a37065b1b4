"""Text classification data: local CSV/TSV/line files and TensorFlow Datasets, with TF-IDF features.

TF-IDF is fitted on the train split only, so val and test words never leak into the vocabulary.
Raw labels are re-indexed 0..C-1 in sorted order (numeric order when every label is an integer).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from metasel import checks
from metasel.data import arrays
from metasel.data.dataset import Dataset

_NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")
Column = int | str


def tfidf(
    train: Sequence[str], *others: Sequence[str], max_features: int = 2000
) -> tuple[list[np.ndarray], tuple[str, ...]]:
  """TF-IDF features fitted on `train` texts and applied to each of `others`: dense float32 (N, F) arrays.

  Returns the feature matrices (train first) and the vocabulary (one name per feature).
  """
  vectorizer = TfidfVectorizer(max_features=max_features, dtype=np.float32)
  matrices = [vectorizer.fit_transform(train)] + [vectorizer.transform(t) for t in others]
  return [m.toarray() for m in matrices], tuple(vectorizer.get_feature_names_out())


def unescape(text: str) -> str:
  """Turn the literal `\\n` of Zhang-style CSVs back into newlines."""
  return text.replace("\\n", "\n")


def read_lines(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
  """Read a `label text` per line file (TextFooler's Yelp format): raw labels, texts, and line numbers.

  One leading and one trailing double quote (left over from the original CSV) are stripped and
  literal `\\n` is unescaped. Blank lines are skipped; line numbers count from 0.
  """
  labels, texts, rows = [], [], []
  with open(_existing(path), encoding="utf-8") as f:
    for i, line in enumerate(f):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      label, sep, text = line.partition(" ")
      if not sep:
        raise ValueError(f"line {i + 1} of {path} has no space after the label {label[:20]!r}; expected 'label text'")
      text = text.removeprefix('"').removesuffix('"')
      labels.append(label)
      texts.append(unescape(text))
      rows.append(i)
  return labels, texts, np.asarray(rows, np.int64)


def read_table(
    path: str | os.PathLike,
    *,
    delimiter: str = ",",
    label_column: Column | None = None,
    text_columns: Sequence[Column] | Column | None = None,
    header: bool | str = "infer",
) -> tuple[list[str], list[str], np.ndarray]:
  """Read a CSV/TSV file with Python's csv module: raw labels, texts (text columns joined by a space), row numbers.

  `label_column` and `text_columns` are column names (needs a header) or int indexes; by default the
  label is the column named "label" if there is one, else column 0, and the text is every other
  column. `header="infer"` takes the first row as a header when it holds the named `label_column`,
  or when some column is numeric in the following rows but not in the first. Row numbers count data
  rows from 0, header excluded.
  """
  if header not in (True, False, "infer"):
    raise ValueError(f"header must be True, False or 'infer', got {header!r}")
  with open(_existing(path), encoding="utf-8", newline="") as f:
    records = [r for r in csv.reader(f, delimiter=delimiter) if r]
  if not records:
    raise ValueError(f"{path} holds no rows; expected a header and/or data rows")
  if header == "infer":
    names_label = isinstance(label_column, str) and label_column in records[0]
    header = names_label or _looks_like_header(records)
  names = records[0] if header else []
  data = records[1:] if header else records
  width = len(records[0])
  if label_column is None:
    label_column = "label" if "label" in names else 0
  label_idx = _column_index("label_column", label_column, names, width, path)
  if text_columns is None:
    text_idx = [i for i in range(width) if i != label_idx]
  else:
    cols = [text_columns] if isinstance(text_columns, (str, int)) else list(text_columns)
    text_idx = [_column_index("text_columns", c, names, width, path) for c in cols]
  if not text_idx:
    raise ValueError(f"{path} has no text column besides the label column {label_idx}; expected at least one")
  for i, r in enumerate(data):
    if len(r) != width:
      raise ValueError(f"data row {i} of {path} has {len(r)} fields; expected {width} like the first row")
  labels = [r[label_idx].strip() for r in data]
  texts = [unescape(" ".join(r[j] for j in text_idx)) for r in data]
  return labels, texts, np.arange(len(data), dtype=np.int64)


def _existing(path: str | os.PathLike) -> Path:
  """`path` as a Path, or a FileNotFoundError naming it."""
  p = Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f"data file not found: {str(path)!r} (resolved to {str(p.resolve())!r})")
  return p


def _looks_like_header(records: list[list[str]]) -> bool:
  """True when some column is numeric in the next rows but not in the first (a named numeric column)."""
  first, rest = records[0], records[1:21]
  if not rest:
    return False
  return any(
      not _NUMBER.match(first[j]) and all(j < len(r) and _NUMBER.match(r[j]) for r in rest) for j in range(len(first))
  )


def _column_index(option: str, column: Column, names: list[str], width: int, path: Any) -> int:
  """Index of `column` (a name in the header or an int index), or a ValueError listing the columns."""
  if isinstance(column, str):
    if not names:
      raise ValueError(
          f"{option}={column!r} names a column but {path} is read without a header; pass header=True or an int index"
      )
    if column not in names:
      raise ValueError(f"{option}={column!r} is not a column of {path}; columns: {names}")
    return names.index(column)
  if isinstance(column, bool) or not isinstance(column, int) or not -width <= column < width:
    described = f"columns: {names}" if names else f"{width} columns, indexes 0..{width - 1}"
    raise ValueError(f"{option}={column!r} is not a column of {path}; it has {described}")
  return column % width


def encode_labels(
    raw: Sequence[Any], label_map: Mapping[Any, int | None] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """Class ids for raw labels: returns y (M,) int32 for the kept rows, their positions (M,), and class names.

  Without `label_map`, classes are the distinct raw labels in sorted order. With it, each raw label
  (matched by its string form) maps to a class id 0..C-1; labels mapped to None or absent from the map
  are dropped. Every class must keep at least one row.
  """
  raw = [str(r).strip() for r in raw]
  present = sorted(set(raw), key=_label_key)
  if label_map is None:
    lookup = {r: i for i, r in enumerate(present)}
    names = tuple(present)
  else:
    if not isinstance(label_map, Mapping):
      raise ValueError(f"label_map must be a dict raw label -> class id or None, got {label_map!r}")
    lookup = {str(k).strip(): v for k, v in label_map.items()}
    missing = sorted(set(lookup) - set(present), key=_label_key)
    if missing:
      raise ValueError(f"label_map keys {missing} do not occur in the data; raw labels present: {present}")
    ids = [v for v in lookup.values() if v is not None]
    for v in ids:
      checks.check_int(f"label_map value for {v!r}", v, minimum=0)
    num_classes = max(ids, default=-1) + 1
    names = tuple("+".join(k for k in present if lookup.get(k) == c) for c in range(num_classes))
    empty = [c for c in range(num_classes) if not names[c]]
    if empty or not num_classes:
      raise ValueError(
          f"label_map {dict(label_map)!r} leaves class {empty[0] if empty else 0} with no samples;"
          " expected class ids 0..C-1 that each receive some raw label present in the data"
      )
  kept = np.array([i for i, r in enumerate(raw) if lookup.get(r) is not None], np.int64)
  y = np.array([lookup[raw[i]] for i in kept], np.int32)
  return y, kept, names


def _label_key(label: str) -> tuple:
  """Sort key: numbers in numeric order before other labels in string order."""
  return (0, float(label), label) if _NUMBER.match(label) else (1, 0.0, label)


def _subsets(y: np.ndarray, n_train, n_val, n_test, seed: int) -> list[np.ndarray]:
  """Stratified train/val/test row subsets of one labelled pool (defaults: 10% val, 20% test, train the rest)."""
  n = len(y)
  n_val = max(len(np.unique(y)), n // 10) if n_val is None else n_val
  n_test = max(len(np.unique(y)), n // 5) if n_test is None else n_test
  return arrays.stratified_subsets(y, [n_train, n_val, n_test], seed, names=["n_train", "n_val", "n_test"])


def _check_common(n_train, n_val, n_test, max_features) -> None:
  """Validate the size options shared by the text loaders."""
  for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
    checks.check_int(name, n, allow_none=True)
  checks.check_int("max_features", max_features)


def _from_texts(name, texts, y, rows, parts, *, max_features, class_names) -> Dataset:
  """Dataset from labelled texts and row subsets (train, val, test) of them, with TF-IDF fitted on train."""
  xs, vocab = tfidf(*[[texts[i] for i in p] for p in parts], max_features=max_features)
  splits = [(x, y[p], None, rows[p]) for x, p in zip(xs, parts)]
  return arrays.from_arrays(
      *splits, name=name, num_classes=len(class_names), feature_names=vocab, class_names=class_names
  )


def _labelled_texts(name, raw, texts, rows, label_map, sizes, seed, max_features) -> Dataset:
  """Encode raw labels, draw stratified splits of `sizes` (train, val, test) and featurise the kept texts."""
  y, kept, class_names = encode_labels(raw, label_map)
  parts = _subsets(y, *sizes, seed)
  kept_texts = [texts[i] for i in kept]
  return _from_texts(name, kept_texts, y, rows[kept], parts, max_features=max_features, class_names=class_names)


def load_table(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    delimiter: str = ",",
    label_column: Column | None = None,
    text_columns: Sequence[Column] | Column | None = None,
    header: bool | str = "infer",
    label_map: Mapping[Any, int | None] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    max_features: int = 2000,
) -> Dataset:
  """A CSV (`delimiter=","`) or TSV (`"\\t"`) text file as a TF-IDF classification dataset.

  Columns and header as in `read_table`; `label_map` as in `encode_labels` (e.g. Yelp stars
  {0: 0, 1: 0, 3: 1, 4: 1} drops 2). Train/val/test are disjoint class-stratified random subsets of
  the rows of sizes n_train (default: all rows left), n_val (10%) and n_test (20%).
  `source_index` is each sample's data row in the file.
  """
  checks.check_seed(seed)
  _check_common(n_train, n_val, n_test, max_features)
  if delimiter not in (",", "\t"):
    raise ValueError(f"delimiter must be ',' or '\\t', got {delimiter!r}")
  raw, texts, rows = read_table(path, delimiter=delimiter, label_column=label_column, text_columns=text_columns,
                                header=header)
  name = f"{'csv' if delimiter == ',' else 'tsv'}:{path}"
  return _labelled_texts(name, raw, texts, rows, label_map, (n_train, n_val, n_test), seed, max_features)


def load_lines(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    label_map: Mapping[Any, int | None] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    max_features: int = 2000,
) -> Dataset:
  """A `label text` per line file (see `read_lines`) as a TF-IDF classification dataset; options as `load_table`."""
  checks.check_seed(seed)
  _check_common(n_train, n_val, n_test, max_features)
  raw, texts, rows = read_lines(path)
  return _labelled_texts(f"lines:{path}", raw, texts, rows, label_map, (n_train, n_val, n_test), seed, max_features)


def load_tfds(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    train_split: str = "train",
    val_split: str | None = None,
    test_split: str = "test",
    label_key: str = "label",
    text_keys: Sequence[str] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    max_features: int = 2000,
    flatten: bool = False,
) -> Dataset:
  """A TensorFlow Datasets classification set read through `tfds.data_source` (array_record, no TensorFlow).

  Text fields (`text_keys`, default all string fields, joined by a space) become TF-IDF features fitted
  on train; otherwise the image field becomes float32 / 255 (flattened with `flatten=True`).
  `val_split=None` uses a "validation" split when the builder lists one, else carves val from the
  train split. Roles that share a TFDS split get disjoint class-stratified subsets (defaults: val 10%,
  test 20%, train the rest); a role alone in its split takes n rows stratified, or all rows when n is None.
  `source_index` is each sample's row within its TFDS split.
  """
  import tensorflow_datasets as tfds  # a slow import, needed only by this source

  checks.check_seed(seed)
  _check_common(n_train, n_val, n_test, max_features)
  for option, value in (("train_split", train_split), ("test_split", test_split), ("label_key", label_key)):
    if not isinstance(value, str) or not value:
      raise ValueError(f"{option} must be a non-empty string, got {value!r}")
  if val_split is not None and (not isinstance(val_split, str) or not val_split):
    raise ValueError(f"val_split must be a split name or None (carve from train), got {val_split!r}")
  if not isinstance(flatten, bool):
    raise ValueError(f"flatten must be True or False, got {flatten!r}")
  if isinstance(text_keys, str):
    text_keys = [text_keys]

  def open_split(split: str):
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                            builder_kwargs={"file_format": "array_record"})

  train_source = open_split(train_split)
  info = train_source.dataset_info
  features = info.features
  if label_key not in features:
    raise ValueError(f"label_key={label_key!r} is not a feature of {name}; features: {list(features)}")
  strings = [k for k, f in features.items() if isinstance(f, tfds.features.Text) and k != label_key]
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if text_keys is not None:
    bad = [k for k in text_keys if k not in features]
    if bad or not text_keys:
      raise ValueError(f"text_keys {list(text_keys)!r} are not all features of {name}; features: {list(features)}")
  elif strings:
    text_keys = strings
  elif not images:
    raise ValueError(f"{name} has no text or image feature to learn from; features: {list(features)}")
  if val_split is None:
    val_split = "validation" if "validation" in info.splits else train_split

  roles = {"train": (train_split, n_train), "val": (val_split, n_val), "test": (test_split, n_test)}
  label_feature = features[label_key]
  records, labels, picked = {}, {}, {}
  for split in dict.fromkeys(s for s, _ in roles.values()):
    source = train_source if split == train_split else open_split(split)
    records[split] = [source[i] for i in range(len(source))]
    labels[split] = np.array([_scalar(r[label_key]) for r in records[split]])
    sharing = [role for role, (s, _) in roles.items() if s == split]
    picked.update(_pick(labels[split], sharing, roles, seed))

  if isinstance(label_feature, tfds.features.ClassLabel):
    num_classes, class_names = label_feature.num_classes, tuple(label_feature.names)
    encode = lambda values: values.astype(np.int32)  # noqa: E731
  else:
    class_names = tuple(sorted({str(v) for v in np.concatenate(list(labels.values()))}, key=_label_key))
    num_classes = len(class_names)
    encode = lambda values: np.array([class_names.index(str(v)) for v in values], np.int32)  # noqa: E731

  rows = {role: picked[role] for role in roles}
  chosen = {role: [records[roles[role][0]][i] for i in rows[role]] for role in roles}
  if text_keys:
    texts = [[" ".join(_text(r[k]) for k in text_keys) for r in chosen[role]] for role in roles]
    xs, feature_names = tfidf(*texts, max_features=max_features)
  else:
    xs = [_images(chosen[role], images[0], flatten) for role in roles]
    feature_names = None
  splits = [(x, encode(labels[roles[role][0]][rows[role]]), None, rows[role]) for x, role in zip(xs, roles)]
  return arrays.from_arrays(
      *splits, name=f"tfds:{name}", num_classes=num_classes, feature_names=feature_names, class_names=class_names,
      check_disjoint=len({s for s, _ in roles.values()}) == 1,
  )


def _pick(y: np.ndarray, sharing: list[str], roles: Mapping[str, tuple[str, int | None]], seed: int) -> dict:
  """Rows of one TFDS split for each role that reads from it: disjoint stratified subsets."""
  if len(sharing) == 1:
    (role,) = sharing
    n = roles[role][1]
    return {role: np.arange(len(y)) if n is None else arrays.stratified_subsets(y, [n], seed, names=[f"n_{role}"])[0]}
  num_classes = len(np.unique(y))
  default = {"train": None, "val": max(num_classes, len(y) // 10), "test": max(num_classes, len(y) // 5)}
  sizes = [default[r] if roles[r][1] is None else roles[r][1] for r in sharing]
  parts = arrays.stratified_subsets(y, sizes, seed, names=[f"n_{r}" for r in sharing])
  return dict(zip(sharing, parts))


def _scalar(value: Any) -> Any:
  """A label as a Python scalar (TFDS gives 0-d numpy arrays)."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value


def _text(value: Any) -> str:
  """A TFDS string field as text."""
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _images(rows: list[Mapping[str, Any]], key: str, flatten: bool) -> np.ndarray:
  """Stack one image field as float32 (N, H, W, C), scaled from uint8 to [0, 1]; (N, H*W*C) if `flatten`."""
  x = np.stack([np.asarray(r[key]) for r in rows])
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  return x.reshape(len(x), -1) if flatten else x
