"""Reading labelled text files: `label text` lines and CSV/TSV tables, row by row, never merging or dropping rows silently.

Tab-separated and line files are read without quote processing unless asked, since SMS and tweet corpora
hold texts that merely begin with a `"`. Rows that span several lines (quoted line breaks) and skipped
blank lines are reported with a `TextFileWarning` naming their line numbers.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TextFileWarning", "Column", "unescape", "read_lines", "read_table", "is_number"]

_NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")
_NAMED = 5  # how many rows or lines a warning names
Column = int | str


class TextFileWarning(UserWarning):
  """A text file holds fewer rows than lines: some rows span several lines, or blank lines were skipped."""


def unescape(text: str) -> str:
  """Turn the literal `\\n` of Zhang-style CSVs back into newlines."""
  return text.replace("\\n", "\n")


def read_lines(path: str | os.PathLike, *, strip_quotes: bool = False) -> tuple[list[str], list[str], np.ndarray]:
  """Read a `label text` per line file (TextFooler's Yelp format): raw labels, texts, and line numbers.

  Every non-blank line is one row, quotes and all; `strip_quotes=True` strips one leading and one
  trailing double quote (left over from an original CSV). Literal `\\n` is unescaped. Blank lines
  are skipped with a `TextFileWarning` naming them; line numbers count from 0.
  """
  if not isinstance(strip_quotes, bool):
    raise ValueError(f"strip_quotes must be True or False, got {strip_quotes!r}")
  labels, texts, rows, blank = [], [], [], []
  with open(_existing(path), encoding="utf-8") as f:
    for i, line in enumerate(f):
      line = line.rstrip("\r\n")
      if not line.strip():
        blank.append(i + 1)
        continue
      label, sep, text = line.partition(" ")
      if not sep:
        raise ValueError(f"line {i + 1} of {path} has no space after the label {label[:20]!r}; expected 'label text'")
      if strip_quotes:
        text = text.removeprefix('"').removesuffix('"')
      labels.append(label)
      texts.append(unescape(text))
      rows.append(i)
  _warn_blank(path, blank)
  return labels, texts, np.asarray(rows, np.int64)


def read_table(
    path: str | os.PathLike,
    *,
    delimiter: str = ",",
    label_column: Column | None = None,
    text_columns: Sequence[Column] | Column | None = None,
    header: bool | str = "infer",
    quoting: bool | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
  """Read a CSV/TSV file with Python's csv module: raw labels, texts (text columns joined by a space), row numbers.

  `label_column` and `text_columns` are column names (needs a header) or int indexes; by default the
  label is the column named "label" if there is one, else column 0, and the text is every other
  column. `header="infer"` takes the first row as a header when it holds the named `label_column`,
  or when some column is numeric in the following rows but not in the first. Row numbers count data
  rows from 0, header excluded.
  `quoting=None` reads CSV quoting (`"a, b"`) in comma-separated files and none in tab-separated ones,
  where a text that merely starts with `"` (SMS, tweets) must stay one row; True or False forces it.
  Rows that span several lines (quoted line breaks) and skipped blank lines raise a `TextFileWarning`
  naming their lines, so the file never yields fewer rows than lines without saying why.
  """
  if header not in (True, False, "infer"):
    raise ValueError(f"header must be True, False or 'infer', got {header!r}")
  if quoting is not None and not isinstance(quoting, bool):
    raise ValueError(f"quoting must be True, False or None (CSV quoting for ',' only), got {quoting!r}")
  quoted = delimiter != "\t" if quoting is None else quoting
  records, spans, blank = _records(path, delimiter, quoted)
  if not records:
    raise ValueError(f"{path} holds no rows; expected a header and/or data rows")
  if header == "infer":
    names_label = isinstance(label_column, str) and label_column in records[0]
    header = names_label or _looks_like_header(records)
  names = records[0] if header else []
  data = records[1:] if header else records
  _warn_spanning(path, spans, bool(header), quoted)
  _warn_blank(path, blank)
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
  for i, (r, lines) in enumerate(zip(data, spans[len(records) - len(data) :])):
    if len(r) != width:
      merged = "; it spans several lines, so a stray quote may have merged rows (try quoting=False)"
      raise ValueError(
          f"data row {i} of {path} ({_lines(*lines)}) has {len(r)} fields; expected {width} like the first row"
          f" ({_lines(*spans[0])}){merged if quoted and lines[1] > lines[0] else ''}"
      )
  labels = [r[label_idx].strip() for r in data]
  texts = [unescape(" ".join(r[j] for j in text_idx)) for r in data]
  return labels, texts, np.arange(len(data), dtype=np.int64)


def _records(
    path: str | os.PathLike, delimiter: str, quoted: bool
) -> tuple[list[list[str]], list[tuple[int, int]], list[int]]:
  """The non-blank records of a delimited file, the (first, last) line number of each, and the blank lines.

  A blank line holds no text in any field. Line numbers count physical lines from 1.
  """
  records, spans, blank = [], [], []
  with open(_existing(path), encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    last = 0
    try:
      for record in reader:
        first, last = last + 1, reader.line_num
        if any(field.strip() for field in record):
          records.append(record)
          spans.append((first, last))
        else:
          blank.append(first)
    except csv.Error as error:
      hint = "; if its quotes are not CSV quoting, read it with quoting=False" if quoted else ""
      raise ValueError(f"could not read {path} from line {last + 1} on: {error}{hint}") from error
  return records, spans, blank


def _lines(first: int, last: int) -> str:
  """'line 4' or 'lines 4-6'."""
  return f"line {first}" if first == last else f"lines {first}-{last}"


def _warn_spanning(path: Any, spans: list[tuple[int, int]], header: bool, quoted: bool) -> None:
  """Warn, naming the first few, about records that span several lines, so fewer rows than lines come back."""
  long = [(i, lines) for i, lines in enumerate(spans) if lines[1] > lines[0]]
  if not long:
    return
  offset = int(header)
  named = ", ".join(
      f"{'header' if i < offset else f'data row {i - offset}'} ({_lines(*lines)})" for i, lines in long[:_NAMED]
  )
  more = f" and {len(long) - _NAMED} more" if len(long) > _NAMED else ""
  hint = "; if its quotes are not CSV quoting, read it with quoting=False" if quoted else ""
  rows = f"1 row of {path} spans" if len(long) == 1 else f"{len(long)} rows of {path} span"
  warnings.warn(
      f"{rows} several lines (quoted line breaks), so it holds fewer rows than lines: {named}{more}{hint}",
      TextFileWarning,
      stacklevel=3,
  )


def _warn_blank(path: Any, blank: list[int]) -> None:
  """Warn, naming the first few, about the blank lines that were skipped."""
  if not blank:
    return
  named = ", ".join(map(str, blank[:_NAMED])) + (f" and {len(blank) - _NAMED} more" if len(blank) > _NAMED else "")
  lines = "line" if len(blank) == 1 else "lines"
  warnings.warn(f"skipped {len(blank)} blank {lines} of {path}: {lines} {named}", TextFileWarning, stacklevel=3)


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
      not is_number(first[j]) and all(j < len(r) and is_number(r[j]) for r in rest) for j in range(len(first))
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


def is_number(text: str) -> bool:
  """Whether `text` reads as a number (an integer or a decimal), spaces around allowed."""
  return bool(_NUMBER.match(text))
