"""The README's example runs as written: a user's own loop over the public step."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
  section = README.read_text().split("## In your own training loop", 1)[1]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_is_short_and_its_example_runs():
  assert len(README.read_text().splitlines()) <= 200
  printed = io.StringIO()
  namespace: dict = {}
  with contextlib.redirect_stdout(printed):
    exec(compile(_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert "online MTS" in printed.getvalue() and "GREATS, 32 of 64" in printed.getvalue()
  assert float(namespace["metrics"]["drop_rate"]) == 0.5  # GREATS kept 32 of the last 64
