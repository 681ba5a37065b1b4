"""Text readers keep every line as its own row unless told otherwise, and the token-id view of the text loaders."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasel import data
from metasel.data import readers, synthetic, text

SPLITS = ("train", "val", "test")
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
# Texts for property tests: quotes, commas and spaces, but no tab, line break or backslash (an escape).
FIELD = st.text(alphabet='ab "\',;x\u00e9', max_size=12)


def _write(tmp_path: Path, name: str, content: str) -> Path:
  path = tmp_path / name
  path.write_text(content, encoding="utf-8", newline="")
  return path


@contextlib.contextmanager
def _no_warnings():
  """A context in which any warning (a TextFileWarning above all) fails the test."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


def _words_csv(tmp_path: Path, rows: int = 60, classes: int = 3) -> Path:
  """label,text rows: a class word, a shared word, and a word unique to the row ("only7")."""
  lines = ["label,text"] + [
      f"{i % classes},{WORDS[i % classes]} {WORDS[i % classes]} shared only{i} {WORDS[3 + i % 3]}" for i in range(rows)
  ]
  return _write(tmp_path, "words.csv", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- readers


SMS = [
    ("ham", '"Hi, are we still on for tonight?'),
    ("spam", 'WINNER!! Claim your "prize" now'),
    ("ham", '"Ok lar... Joking wif u oni'),
    ("ham", "See you at 5, bring the book"),
    ("spam", '"FREE entry" in a weekly comp"'),
    ("ham", '"'),
    ("ham", "I'll call you later"),
    ("spam", 'URGENT! "call 0800 now'),
]


def test_tsv_texts_that_start_with_a_quote_stay_one_row_each(tmp_path):
  path = _write(tmp_path, "sms.tsv", "".join(f"{label}\t{body}\n" for label, body in SMS))
  with _no_warnings():
    labels, texts, rows = readers.read_table(path, delimiter="\t")
  assert labels == [label for label, _ in SMS] and texts == [body for _, body in SMS]  # in order, quotes kept
  np.testing.assert_array_equal(rows, np.arange(len(SMS)))
  with _no_warnings():
    ds = data.load(f"tsv:{path}", n_train=4, n_val=2, n_test=2)
  assert sorted(np.concatenate([getattr(ds, s).source_index for s in SPLITS]).tolist()) == list(range(len(SMS)))

  # Read as CSV quoting, the unmatched quotes swallow the following lines, and the reader says so.
  with pytest.warns(readers.TextFileWarning, match=r"rows? of .*sms.tsv spans? several lines.*data row 0 \(lines 1-"):
    merged = readers.read_table(path, delimiter="\t", quoting=True)[1]
  assert len(merged) < len(SMS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(FIELD, min_size=1, max_size=15))
def test_tsv_reads_every_line_back_unchanged(tmp_path, bodies):
  path = _write(tmp_path, "any.tsv", "".join(f"{i % 2}\t{b}\n" for i, b in enumerate(bodies)))
  with _no_warnings():
    labels, texts, rows = readers.read_table(path, delimiter="\t", header=False)
  assert texts == bodies and labels == [str(i % 2) for i in range(len(bodies))]
  np.testing.assert_array_equal(rows, np.arange(len(bodies)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(FIELD, FIELD), min_size=1, max_size=10))
def test_tsv_with_quoting_reads_csv_quoting_like_a_csv(tmp_path, fields):
  def quoted(t):
    return '"' + t.replace('"', '""') + '"'

  rows = [("label", "title", "body")] + [(str(i % 3), a, b) for i, (a, b) in enumerate(fields)]
  csv_path = _write(tmp_path, "q.csv", "".join(",".join(map(quoted, r)) + "\n" for r in rows))
  tsv_path = _write(tmp_path, "q.tsv", "".join("\t".join(map(quoted, r)) + "\n" for r in rows))
  with _no_warnings():
    from_csv = readers.read_table(csv_path, header=True)
    from_tsv = readers.read_table(tsv_path, delimiter="\t", header=True, quoting=True)
  assert from_tsv[:2] == from_csv[:2] and from_csv[1] == [f"{a} {b}" for a, b in fields]
  literal = readers.read_table(tsv_path, delimiter="\t", header=True)[1]  # default: quotes are text
  assert literal == [f"{quoted(a)} {quoted(b)}" for a, b in fields]


def test_tsv_quoting_option_reaches_the_loader(tmp_path):
  rows = [f"{i % 2}\t{WORDS[i % 2]} word {i}" for i in range(30)]
  rows[4] = '0\t"alpha\nword 4"'  # a quoted line break: one row when read with quoting
  path = _write(tmp_path, "quoted.tsv", "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"data row 5 of .*quoted.tsv \(line 6\) has 1 fields; expected 2"):
    data.load(f"tsv:{path}")
  with pytest.warns(readers.TextFileWarning, match=r"1 row of .*quoted.tsv spans several lines.*data row 4 \(lines 5-6\)"):
    ds = data.load(f"tsv:{path}", quoting=True, n_train=16, n_val=6, n_test=8, max_features=50)
  assert len(ds.train) + len(ds.val) + len(ds.test) == 30 and "word" in ds.feature_names
  with pytest.raises(ValueError, match="quoting must be True, False or None .*got 'yes'"):
    data.load(f"tsv:{path}", quoting="yes")


def test_lines_keep_quotes_unless_asked_and_warn_about_blank_lines(tmp_path):
  path = _write(tmp_path, "y.txt", '1 "great place"\n0 "a bad "day"\n\n1 fine\n   \n0 "\n')
  with pytest.warns(readers.TextFileWarning, match=r"skipped 2 blank lines of .*y.txt: lines 3, 5"):
    labels, texts, rows = readers.read_lines(path)
  assert labels == ["1", "0", "1", "0"] and texts == ['"great place"', '"a bad "day"', "fine", '"']
  np.testing.assert_array_equal(rows, [0, 1, 3, 5])
  with pytest.warns(readers.TextFileWarning):
    stripped = readers.read_lines(path, strip_quotes=True)[1]
  assert stripped == ["great place", 'a bad "day', "fine", ""]
  with pytest.raises(ValueError, match="strip_quotes must be True or False, got 'yes'"):
    readers.read_lines(path, strip_quotes="yes")

  plain = _write(tmp_path, "p.txt", "".join(f'{i % 2} "text {i}\n' for i in range(20)))  # ends in one newline
  with _no_warnings():
    ds = data.load(f"lines:{plain}", strip_quotes=True, n_train=10, n_val=4, n_test=6)
  assert len(ds.train) == 10


def test_csv_rows_spanning_lines_and_blank_lines_are_reported(tmp_path):
  content = 'label,text\n0,one\n1,"two\nlines"\n\n0,three\n1,"four\n\nlines"\n0,five\n'
  path = _write(tmp_path, "multi.csv", content)
  with pytest.warns(readers.TextFileWarning) as record:
    labels, texts, rows = readers.read_table(path)
  messages = [str(w.message) for w in record]
  assert any("2 rows of" in m and "data row 1 (lines 3-4), data row 3 (lines 7-9)" in m for m in messages)
  assert any("skipped 1 blank line of" in m and "line 5" in m for m in messages)
  assert texts == ["one", "two\nlines", "three", "four\n\nlines", "five"] and len(rows) == 5

  ending = _write(tmp_path, "end.csv", "label,text\n0,a b\n1,c d\n")  # one final newline is no blank line
  with _no_warnings():
    assert len(readers.read_table(ending)[0]) == 2


def test_bad_rows_name_their_line(tmp_path):
  path = _write(tmp_path, "bad.tsv", "0\tfine\n1\tfine too\n\n0\tone\textra field\n")
  with pytest.warns(readers.TextFileWarning, match="line 3"):
    with pytest.raises(ValueError, match=r"data row 2 of .*bad.tsv \(line 4\) has 3 fields; expected 2 .*\(line 1\)"):
      readers.read_table(path, delimiter="\t")
  merged = _write(tmp_path, "merged.csv", 'label,text\n0,"open\n1,x",y\n')
  with pytest.warns(readers.TextFileWarning):
    with pytest.raises(ValueError, match=r"data row 0 .*\(lines 2-3\) has 3 fields.*merged rows"):
      readers.read_table(merged, header=True, label_column=0, text_columns=[1])
  runaway = _write(tmp_path, "runaway.csv", 'label,text\n0,"' + "x" * 140_000 + "\n1,y\n")
  with pytest.raises(ValueError, match=r"could not read .*runaway.csv from line 2 on: field larger.*quoting=False"):
    readers.read_table(runaway)


# ---------------------------------------------------------------------------------------------- token ids


def test_token_ids_truncate_pad_and_break_ties_in_order():
  train = ["bb cc dd ee ff", "BB cc", "", "!! a"]  # "a" is one character: not a word (as for TF-IDF)
  (x, other), vocab = text.tokens(train, ["ee bb", "zz"], max_length=3, vocab_size=5)
  assert vocab == ("<pad>", "<unk>", "bb", "cc", "dd")  # counts 2, 2, then the first of the 1s in string order
  assert text.PAD_ID == 0 and text.UNK_ID == 1 and vocab[text.PAD_ID] == "<pad>" and vocab[text.UNK_ID] == "<unk>"
  np.testing.assert_array_equal(x, [[2, 3, 4], [2, 3, 0], [1, 0, 0], [1, 0, 0]])  # empty texts kept as one <unk>
  np.testing.assert_array_equal(other, [[1, 2, 0], [1, 0, 0]])
  assert x.dtype == other.dtype == np.int32
  np.testing.assert_array_equal(text.token_mask(x), x != 0)
  assert np.asarray(text.token_mask(jnp.asarray(x))).tolist() == (x != 0).tolist()
  with pytest.raises(ValueError, match="vocabulary starts with \\('bb', 'cc'\\); expected \\('<pad>', '<unk>'\\)"):
    text.token_ids(["bb"], ("bb", "cc"))


@settings(max_examples=60, deadline=None)
@given(
    train=st.lists(st.lists(st.sampled_from(WORDS + ["x", "new"]), max_size=9).map(" ".join), min_size=1, max_size=8),
    others=st.lists(st.lists(st.sampled_from(WORDS + ["unseen", "new"]), max_size=9).map(" ".join), max_size=8),
    max_length=st.integers(1, 6),
    vocab_size=st.integers(3, 12),
)
def test_token_ids_are_the_words_in_order_cut_and_padded(train, others, max_length, vocab_size):
  (x, y), vocab = text.tokens(train, others, max_length=max_length, vocab_size=vocab_size)
  assert len(vocab) <= vocab_size and len(set(vocab)) == len(vocab) and vocab[:2] == text.SPECIAL_TOKENS
  train_words = {w for t in train for w in t.split() if len(w) > 1}
  assert set(vocab[2:]) <= train_words  # fitted on train only
  for ids, texts in ((x, train), (y, others)):
    assert ids.dtype == np.int32 and ids.shape == (len(texts), max_length)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < len(vocab)
    for row, t in zip(ids, texts):
      words = [w for w in t.split() if len(w) > 1][:max_length]
      expected = [vocab.index(w) if w in vocab[2:] else text.UNK_ID for w in words] or [text.UNK_ID]
      assert row.tolist() == expected + [text.PAD_ID] * (max_length - len(expected))


def test_token_view_of_a_csv_fits_its_vocabulary_on_train_only(tmp_path):
  path = _words_csv(tmp_path)
  options = {"n_train": 30, "n_val": 12, "n_test": 15, "representation": "tokens", "max_length": 4}
  ds = data.load(f"csv:{path}", seed=0, **options)
  assert ds.is_tokens and ds.input_shape == (4,) and ds.feature_names == ("t0", "t1", "t2", "t3")
  assert len(ds.vocabulary) <= 20000 and ds.vocabulary[:2] == ("<pad>", "<unk>")
  only = {w for w in ds.vocabulary if w.startswith("only")}
  assert only == {f"only{i}" for i in ds.train.source_index}  # a test row's own word is never in the vocabulary
  for split in SPLITS:
    s = getattr(ds, split)
    assert s.x.dtype == np.int32 and s.x.shape == (len(s), 4)
    assert s.x.min() >= 0 and s.x.max() < len(ds.vocabulary)
    assert (s.x[:, 3] == text.UNK_ID).all() == (split != "train")  # "only{i}" is the 4th word: <unk> outside train
  first = [ds.vocabulary[i] for i in ds.train.x[0]]
  assert first == [WORDS[ds.train.y[0]]] * 2 + ["shared", f"only{ds.train.source_index[0]}"]  # cut at 4 words

  again = data.load(f"csv:{path}", seed=0, **options)
  assert again.vocabulary == ds.vocabulary
  for split in SPLITS:
    np.testing.assert_array_equal(getattr(again, split).x, getattr(ds, split).x)
  small = data.load(f"csv:{path}", seed=1, **{**options, "vocab_size": 6, "max_length": 8})
  assert len(small.vocabulary) == 6 and small.train.x.shape == (30, 8)
  assert not np.array_equal(small.train.source_index, ds.train.source_index)
  padded = small.train.x[:, 5:]
  assert (padded == text.PAD_ID).all() and not text.token_mask(padded).any()  # 5 words, then padding

  tfidf = data.load(f"csv:{path}", seed=0, n_train=30, n_val=12, n_test=15)
  assert not tfidf.is_tokens and tfidf.vocabulary == () and tfidf.train.x.dtype == np.float32


def test_token_view_of_lines_and_tsv(tmp_path):
  lines = _write(tmp_path, "l.txt", "".join(f'{i % 2} "{WORDS[i % 2]} review {i}"\n' for i in range(40)))
  ds = data.load(f"lines:{lines}", representation="tokens", max_length=5, n_train=20, n_val=8, n_test=12)
  assert ds.train.x.shape == (20, 5) and set(ds.vocabulary[2:]) <= {"alpha", "beta", "review"} | {
      str(i) for i in range(10, 40)
  }
  tsv = _write(tmp_path, "t.tsv", "".join(f'{i % 2}\t"{WORDS[i % 2]} text\n' for i in range(40)))
  ts = data.load(f"tsv:{tsv}", representation="tokens", max_length=3, vocab_size=4, n_train=20, n_val=8, n_test=12)
  assert ts.vocabulary == ("<pad>", "<unk>", "text", "alpha")  # "alpha" and "beta" tie at 10: string order
  assert len(ts.train) + len(ts.val) + len(ts.test) == 40


def test_text_loaders_reject_bad_token_options_before_reading(tmp_path):
  missing = tmp_path / "missing.csv"
  for options, match in [
      ({"representation": "bag"}, r"unknown representation 'bag'; expected one of \('tfidf', 'tokens'\)"),
      ({"representation": "tokens", "max_length": 0}, "max_length must be an integer >= 1, got 0"),
      ({"representation": "tokens", "vocab_size": 2}, "vocab_size must be an integer >= 3, got 2"),
      ({"max_length": 1.5}, "max_length must be an integer"),  # checked whichever the representation
  ]:
    with pytest.raises(ValueError, match=match):
      data.load(f"csv:{missing}", **options)
    with pytest.raises(ValueError, match=match):
      data.load(f"lines:{missing}", **options)


# ---------------------------------------------------------------------------------------------- datasets


def test_from_arrays_keeps_integer_features_and_checks_token_ids():
  rng = np.random.default_rng(0)
  y = np.arange(12) % 3
  ints = rng.integers(0, 9, (12, 5))
  plain = data.from_arrays((ints, y), (ints, y), (ints, y))
  assert plain.train.x.dtype == np.int32 and not plain.is_tokens and plain.feature_names[0] == "x0"
  floats = data.from_arrays((ints.astype(float), y), (ints, y), (ints, y))
  assert floats.train.x.dtype == np.float32 and floats.val.x.dtype == np.int32
  vocab = ("<pad>", "<unk>", "a", "b", "c", "d", "e", "f", "g")
  tok = data.from_arrays((ints, y), (ints, y), (ints, y), vocabulary=vocab)
  assert tok.is_tokens and tok.vocabulary == vocab and tok.feature_names == tuple(f"t{i}" for i in range(5))
  assert tok.input_shape == (5,) and tok.train.x.dtype == np.int32
  with pytest.raises(ValueError, match=r"val x has token ids in \[0, 8\]; expected ids 0..7 \(a vocabulary of 8"):
    data.from_arrays((ints % 8, y), (ints, y), (ints, y), vocabulary=vocab[:8])
  with pytest.raises(ValueError, match=r"train x has shape \(12, 5\) and dtype float64; expected integer token ids"):
    data.from_arrays((ints.astype(float), y), (ints, y), (ints, y), vocabulary=vocab)
  with pytest.raises(ValueError, match=r"vocabulary lists 'a' twice \(ids 2 and 3\)"):
    data.from_arrays((ints, y), (ints, y), (ints, y), vocabulary=("<pad>", "<unk>", "a", "a"))
  with pytest.raises(ValueError, match="vocabulary must be a sequence of token strings"):
    data.from_arrays((ints, y), (ints, y), (ints, y), vocabulary="abc")
  with pytest.raises(ValueError, match=r"train x has integer values in .*; expected values that fit int32"):
    data.from_arrays((ints * 2**40, y), (ints, y), (ints, y))


def _source_rows(ds: data.Dataset, inner: data.Dataset) -> np.ndarray:
  """Token rows of `inner`'s train split that each of `ds`'s train rows was made from (by source_index)."""
  position = {int(s): i for i, s in enumerate(inner.train.source_index)}
  return inner.train.x[[position[int(s)] for s in ds.train.source_index]]


def test_corrupted_csv_tokens_tiers(tmp_path):
  path = _words_csv(tmp_path, rows=150)
  options = {"n_train": 120, "n_val": 12, "n_test": 18, "representation": "tokens", "max_length": 6}
  tiers = {"label_noise": 0.2, "feature_noise": 0.2, "near_duplicate": 0.1, "pure_noise": 0.2}
  ds = data.load(f"corrupted:csv:{path}", seed=1, n_real=30, n_synthetic=200, tiers=tiers, **options)
  inner = data.load(f"csv:{path}", seed=1, **options)
  assert ds.is_tokens and ds.vocabulary == inner.vocabulary and ds.input_shape == (6,)
  assert [len(getattr(ds, s)) for s in SPLITS] == [230, 12, 18]
  counts = np.bincount(ds.train.tier[30:], minlength=5)
  assert counts.tolist() == [60, 40, 40, 20, 40]
  for split in SPLITS:
    x = getattr(ds, split).x
    assert x.dtype == np.int32 and x.min() >= 0 and x.max() < len(ds.vocabulary)

  x, tier, source = ds.train.x, ds.train.tier, _source_rows(ds, inner)
  changed = x != source
  lengths = text.token_mask(x).sum(1)
  assert not changed[tier <= 1].any()  # clean and label noise: unchanged token rows
  assert (changed[tier == 2].sum(1) == np.ceil(0.3 * lengths[tier == 2])).all()  # 30% of the words, at least one
  assert set(changed[tier == 3].sum(1).tolist()) <= {1, 2} and changed[tier == 3].any(1).all()
  assert len(np.unique(ds.train.source_index[tier == 3])) <= synthetic.CORRUPTED_DUPLICATE_SOURCES
  assert (x[changed] >= 2).all()  # replacements are words, never <pad> or <unk>
  assert (text.token_mask(x) == text.token_mask(source))[tier <= 3].all()  # lengths kept
  real_lengths = text.token_mask(inner.train.x).sum(1)
  noise = x[tier == 4]
  assert (lengths[tier == 4] >= real_lengths.min()).all() and (lengths[tier == 4] <= real_lengths.max()).all()
  assert (noise[text.token_mask(noise)] >= 2).all()
  np.testing.assert_array_equal(text.token_mask(noise), np.arange(6) < lengths[tier == 4][:, None])  # pads at end

  again = data.load(f"corrupted:csv:{path}", seed=1, n_real=30, n_synthetic=200, tiers=tiers, **options)
  np.testing.assert_array_equal(again.train.x, ds.train.x)

  flipped = synthetic.label_noise(inner, 0.25, seed=0)
  assert flipped.vocabulary == inner.vocabulary and flipped.is_tokens
  np.testing.assert_array_equal(flipped.train.x, inner.train.x)
  assert (flipped.train.y != inner.train.y).sum() == 30


def test_corrupted_tokens_need_two_words():
  y = np.arange(12) % 2
  ids = np.full((12, 3), 2)
  tiny = data.from_arrays((ids, y), (ids, y), (ids, y), vocabulary=("<pad>", "<unk>", "w"), check_disjoint=False)
  with pytest.raises(ValueError, match=r"vocabulary of 3 tokens; .*expected at least 2 words besides"):
    synthetic.corrupted_mixture(tiny, n_real=4, n_synthetic=4)
  wider = dataclasses.replace(tiny, vocabulary=("<pad>", "<unk>", "w", "v"))
  assert synthetic.corrupted_mixture(wider, n_real=4, n_synthetic=8).train.x.max() <= 3


def test_tfds_token_view_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  options = {"n_train": 40, "n_val": 12, "n_test": 20, "representation": "tokens", "text_keys": ["title"]}
  with tfds.testing.mock_data(num_examples=80):
    ds = data.load("tfds:ag_news_subset", seed=0, max_length=8, **options)
    again = data.load("tfds:ag_news_subset", seed=0, max_length=8, **options)
    small = data.load("tfds:ag_news_subset", seed=0, max_length=8, vocab_size=10, **options)
    source = tfds.data_source("ag_news_subset", split="train", builder_kwargs={"file_format": "array_record"})
    titles = {split: [text._text(source[int(i)]["title"]) for i in getattr(ds, split).source_index] for split in SPLITS}
    with pytest.raises(ValueError, match="representation='tokens' needs text fields, but mnist has only image"):
      data.load("tfds:mnist", representation="tokens")
  assert ds.is_tokens and ds.num_classes == 4 and ds.input_shape == (8,)
  assert len(small.vocabulary) == 10 and len(ds.vocabulary) <= 20000
  assert ds.vocabulary == text.fit_vocabulary(titles["train"])  # fitted on the train rows' titles only
  for split in SPLITS:
    s = getattr(ds, split)
    assert s.x.dtype == np.int32 and s.x.min() >= 0 and s.x.max() < len(ds.vocabulary)
    np.testing.assert_array_equal(s.x, text.token_ids(titles[split], ds.vocabulary, 8))
    np.testing.assert_array_equal(s.x, getattr(again, split).x)
