"""Text classification data: local CSV/TSV/line files and TensorFlow Datasets, as TF-IDF features or token ids.

TF-IDF and the token vocabulary are fitted on the train split only, so val and test words never leak
into them. Raw labels are re-indexed 0..C-1 in sorted order (numeric order when every label is an integer).
Files are read by `metasel.data.readers`, which never merges or drops rows silently.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from metasel import checks, extras
from metasel.data import arrays
from metasel.data.dataset import Dataset
from metasel.data.readers import Column, is_number, read_lines, read_table

PAD_ID = 0  # "<pad>": fills a token row past the end of its text
UNK_ID = 1  # "<unk>": a token the training split's vocabulary does not hold
SPECIAL_TOKENS = ("<pad>", "<unk>")  # the tokens of ids PAD_ID and UNK_ID; kept words take the ids after them
REPRESENTATIONS = ("tfidf", "tokens")
DEFAULT_VOCAB_SIZE = 20000  # token ids a vocabulary may hold, the two special tokens included
DEFAULT_MAX_LENGTH = 128  # tokens kept per text
TFDS_CHUNK_SIZE = 1024  # records asked of a TFDS data source per `__getitems__` call



def _sklearn_text():
  """scikit-learn's text vectorizers, from the experiments extra."""
  return extras.load("sklearn.feature_extraction.text", needed_by="the text datasets")

def tfidf(
    train: Sequence[str], *others: Sequence[str], max_features: int = 2000
) -> tuple[list[np.ndarray], tuple[str, ...]]:
  """TF-IDF features fitted on `train` texts and applied to each of `others`: dense float32 (N, F) arrays.

  Returns the feature matrices (train first) and the vocabulary (one name per feature).
  """
  vectorizer = _sklearn_text().TfidfVectorizer(max_features=max_features, dtype=np.float32)
  matrices = [vectorizer.fit_transform(train)] + [vectorizer.transform(t) for t in others]
  return [m.toarray() for m in matrices], tuple(vectorizer.get_feature_names_out())


def token_mask(ids):
  """True at real tokens and False at padding (`ids != PAD_ID`), for numpy or jax arrays of token ids."""
  return ids != PAD_ID


def _analyzer() -> Callable[[str], list[str]]:
  """scikit-learn's default word analyzer, the one TF-IDF uses: a text's lowercased words of 2+ characters, in order."""
  return _sklearn_text().CountVectorizer(lowercase=True).build_analyzer()


def fit_vocabulary(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> tuple[str, ...]:
  """The token of each id: "<pad>", "<unk>", then the most frequent words of `texts`, ties in string order.

  `vocab_size` counts every id, the two special ones included; fewer distinct words give a shorter vocabulary.
  """
  checks.check_int("vocab_size", vocab_size, minimum=len(SPECIAL_TOKENS) + 1)
  analyze = _analyzer()
  counts = Counter(token for t in texts for token in analyze(t))
  kept = sorted(counts, key=lambda token: (-counts[token], token))[: vocab_size - len(SPECIAL_TOKENS)]
  return SPECIAL_TOKENS + tuple(kept)


def token_ids(texts: Sequence[str], vocabulary: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
  """int32 (N, max_length) ids of each text's words in order, cut at max_length and padded with PAD_ID.

  Words outside `vocabulary` become UNK_ID; a text with no words at all becomes one UNK_ID, so that
  every row keeps at least one unmasked position (no row is ever dropped).
  """
  checks.check_int("max_length", max_length)
  if tuple(vocabulary[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
    raise ValueError(
        f"vocabulary starts with {tuple(vocabulary[:len(SPECIAL_TOKENS)])!r}; expected {SPECIAL_TOKENS} (ids PAD_ID,"
        " UNK_ID) before the words, as `fit_vocabulary` makes it"
    )
  index = {token: i for i, token in enumerate(vocabulary) if i >= len(SPECIAL_TOKENS)}
  analyze = _analyzer()
  ids = np.full((len(texts), max_length), PAD_ID, np.int32)
  for row, t in enumerate(texts):
    words = [index.get(token, UNK_ID) for token in analyze(t)[:max_length]] or [UNK_ID]
    ids[row, : len(words)] = words
  return ids


def tokens(
    train: Sequence[str], *others: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tuple[list[np.ndarray], tuple[str, ...]]:
  """Token ids of `train` texts and of each of `others`, with a vocabulary fitted on `train` only.

  Returns the int32 (N, max_length) id matrices (train first) and the vocabulary (the token of each id).
  """
  vocabulary = fit_vocabulary(train, vocab_size)
  return [token_ids(t, vocabulary, max_length) for t in (train, *others)], vocabulary


def _featurise(
    train: Sequence[str], *others: Sequence[str], representation: str, max_features: int, max_length: int,
    vocab_size: int,
) -> tuple[list[np.ndarray], tuple[str, ...], tuple[str, ...]]:
  """TF-IDF features or token ids of each split's texts, fitted on train: the matrices, column names, vocabulary.

  The vocabulary is empty for TF-IDF (its words are the column names); token columns are positions t0, t1, ...
  """
  if representation == "tokens":
    xs, vocabulary = tokens(train, *others, max_length=max_length, vocab_size=vocab_size)
    return xs, tuple(f"t{i}" for i in range(max_length)), vocabulary
  xs, names = tfidf(train, *others, max_features=max_features)
  return xs, names, ()


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
  return (0, float(label), label) if is_number(label) else (1, 0.0, label)


def _subsets(y: np.ndarray, n_train, n_val, n_test, seed: int) -> list[np.ndarray]:
  """Stratified train/val/test row subsets of one labelled pool (defaults: 10% val, 20% test, train the rest)."""
  n = len(y)
  n_val = max(len(np.unique(y)), n // 10) if n_val is None else n_val
  n_test = max(len(np.unique(y)), n // 5) if n_test is None else n_test
  return arrays.stratified_subsets(y, [n_train, n_val, n_test], seed, names=["n_train", "n_val", "n_test"])


def _check_common(n_train, n_val, n_test, features: Mapping[str, Any]) -> None:
  """Validate the size and featurisation options shared by the text loaders (every one, whichever representation)."""
  for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
    checks.check_int(name, n, allow_none=True)
  checks.check_choice("representation", features["representation"], REPRESENTATIONS)
  checks.check_int("max_features", features["max_features"])
  checks.check_int("max_length", features["max_length"])
  checks.check_int("vocab_size", features["vocab_size"], minimum=len(SPECIAL_TOKENS) + 1)


def _from_texts(name, texts, y, rows, parts, *, class_names, features: Mapping[str, Any]) -> Dataset:
  """Dataset from labelled texts and row subsets (train, val, test) of them, with features fitted on train."""
  xs, feature_names, vocabulary = _featurise(*[[texts[i] for i in p] for p in parts], **features)
  splits = [(x, y[p], None, rows[p]) for x, p in zip(xs, parts)]
  return arrays.from_arrays(
      *splits, name=name, num_classes=len(class_names), feature_names=feature_names, class_names=class_names,
      vocabulary=vocabulary,
  )


def _labelled_texts(name, raw, texts, rows, label_map, sizes, seed, features: Mapping[str, Any]) -> Dataset:
  """Encode raw labels, draw stratified splits of `sizes` (train, val, test) and featurise the kept texts."""
  y, kept, class_names = encode_labels(raw, label_map)
  parts = _subsets(y, *sizes, seed)
  kept_texts = [texts[i] for i in kept]
  return _from_texts(name, kept_texts, y, rows[kept], parts, class_names=class_names, features=features)


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
    quoting: bool | None = None,
    representation: str = "tfidf",
    max_length: int = DEFAULT_MAX_LENGTH,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Dataset:
  """A CSV (`delimiter=","`) or TSV (`"\\t"`) text file as a classification dataset of TF-IDF features or token ids.

  Columns, header and quoting as in `read_table`; `label_map` as in `encode_labels` (e.g. Yelp stars
  {0: 0, 1: 0, 3: 1, 4: 1} drops 2). Train/val/test are disjoint class-stratified random subsets of
  the rows of sizes n_train (default: all rows left), n_val (10%) and n_test (20%).
  `representation="tfidf"` gives float32 TF-IDF of `max_features` train words; "tokens" gives int32
  (N, max_length) ids into a train vocabulary of at most `vocab_size` ids (see `tokens`), with
  `Dataset.vocabulary` set. `source_index` is each sample's data row in the file.
  """
  checks.check_seed(seed)
  features = dict(representation=representation, max_features=max_features, max_length=max_length,
                  vocab_size=vocab_size)
  _check_common(n_train, n_val, n_test, features)
  if delimiter not in (",", "\t"):
    raise ValueError(f"delimiter must be ',' or '\\t', got {delimiter!r}")
  raw, texts, rows = read_table(path, delimiter=delimiter, label_column=label_column, text_columns=text_columns,
                                header=header, quoting=quoting)
  name = f"{'csv' if delimiter == ',' else 'tsv'}:{path}"
  return _labelled_texts(name, raw, texts, rows, label_map, (n_train, n_val, n_test), seed, features)


def load_lines(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    label_map: Mapping[Any, int | None] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    max_features: int = 2000,
    strip_quotes: bool = False,
    representation: str = "tfidf",
    max_length: int = DEFAULT_MAX_LENGTH,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Dataset:
  """A `label text` per line file (see `read_lines`) as a classification dataset; options as `load_table`."""
  checks.check_seed(seed)
  features = dict(representation=representation, max_features=max_features, max_length=max_length,
                  vocab_size=vocab_size)
  _check_common(n_train, n_val, n_test, features)
  raw, texts, rows = read_lines(path, strip_quotes=strip_quotes)
  return _labelled_texts(f"lines:{path}", raw, texts, rows, label_map, (n_train, n_val, n_test), seed, features)


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
    representation: str = "tfidf",
    max_length: int = DEFAULT_MAX_LENGTH,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Dataset:
  """A TensorFlow Datasets classification set read through `tfds.data_source` (array_record, no TensorFlow).

  Text fields (`text_keys`, default all string fields, joined by a space) become TF-IDF features or,
  with `representation="tokens"`, token ids (as in `load_table`), fitted on train; otherwise the image
  field becomes float32 / 255 (flattened with `flatten=True`) and representation must stay "tfidf".
  `val_split=None` uses a "validation" split when the builder lists one, else carves val from the
  train split. Roles that share a TFDS split get disjoint class-stratified subsets (defaults: val 10%,
  test 20%, train the rest); a role alone in its split takes n rows stratified, or all rows when n is None.
  `source_index` is each sample's row within its TFDS split.
  """
  tfds = extras.load("tensorflow_datasets", needed_by="metasel.data.text.load_tfds")  # a slow import, only here

  checks.check_seed(seed)
  features_options = dict(representation=representation, max_features=max_features, max_length=max_length,
                          vocab_size=vocab_size)
  _check_common(n_train, n_val, n_test, features_options)
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
  if representation == "tokens" and not text_keys:
    raise ValueError(
        f"representation='tokens' needs text fields, but {name} has only image features {images};"
        " expected representation='tfidf' (images are read as pixels either way)"
    )
  if val_split is None:
    val_split = "validation" if "validation" in info.splits else train_split

  roles = {"train": (train_split, n_train), "val": (val_split, n_val), "test": (test_split, n_test)}
  label_feature = features[label_key]
  records, labels, picked = {}, {}, {}
  for split in dict.fromkeys(s for s, _ in roles.values()):
    source = train_source if split == train_split else open_split(split)
    records[split] = _read_split(source, f"tfds:{name}", split)
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
    xs, feature_names, vocabulary = _featurise(*texts, **features_options)
  else:
    xs = [_images(chosen[role], images[0], flatten) for role in roles]
    feature_names, vocabulary = None, ()
  splits = [(x, encode(labels[roles[role][0]][rows[role]]), None, rows[role]) for x, role in zip(xs, roles)]
  return arrays.from_arrays(
      *splits, name=f"tfds:{name}", num_classes=num_classes, feature_names=feature_names, class_names=class_names,
      check_disjoint=len({s for s, _ in roles.values()}) == 1, vocabulary=vocabulary,
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


def _read_split(source, dataset: str, split: str) -> list:
  """Every record of a TFDS data source in row order, `TFDS_CHUNK_SIZE` rows per batch read.

  array_record reads many records at once far faster than one at a time.
  """
  n = len(source)
  records = []
  for start in range(0, n, TFDS_CHUNK_SIZE):
    records.extend(_read_chunk(source, list(range(start, min(start + TFDS_CHUNK_SIZE, n))), dataset, split))
  return records


def _read_chunk(source, keys: list[int], dataset: str, split: str) -> list:
  """Records `keys` of a TFDS data source, read with one `__getitems__` call when the source has one.

  A failed batch read (or a source without `__getitems__`) is redone record by record, so a record that
  cannot be read raises a ValueError naming its split and row instead of being dropped.
  """
  read_many = getattr(source, "__getitems__", None)
  if read_many is not None:
    try:
      batch = list(read_many(keys))
    except Exception:  # re-read record by record below: names the failing row, or recovers the batch
      batch = None
    if batch is not None:
      if len(batch) != len(keys):
        raise ValueError(
            f"{dataset}: split {split!r} gave {len(batch)} records for the {len(keys)} rows"
            f" {keys[0]}..{keys[-1]}; expected one record per row"
        )
      return batch
  return [_read_record(source, i, dataset, split) for i in keys]


def _read_record(source, index: int, dataset: str, split: str) -> Any:
  """Record `index` of a TFDS data source; a read or decode failure names the split and row."""
  try:
    return source[index]
  except Exception as err:
    raise ValueError(
        f"{dataset}: row {index} of split {split!r} could not be read or decoded: {type(err).__name__}: {err}"
    ) from err


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
