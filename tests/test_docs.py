"""The docs site builds strictly (broken links, missing pages and docstring errors fail), and every Python block
of its guides runs as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))


def python_blocks(page: Path) -> list[str]:
  """The page's fenced ```python blocks, in order."""
  return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_the_docs_build_strictly(tmp_path):
  if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
    pytest.fail("mkdocs is not installed; expected it from the dev extra (pip install -e '.[dev]')")
  mkdocs = Path(sys.executable).parent / "mkdocs"
  done = subprocess.run(
      [str(mkdocs if mkdocs.exists() else "mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
  )
  assert done.returncode == 0, done.stderr[-4000:]
  assert (tmp_path / "site" / "api" / "train" / "index.html").read_text().count("make_step") > 0


def test_every_guide_has_python_and_each_block_runs_as_written():
  assert {page.stem for page in GUIDES} == {"own-loop", "your-model", "devices", "forecasting"}
  for page in GUIDES:
    namespace: dict = {}
    for block in python_blocks(page):
      exec(compile(block, str(page), "exec"), namespace)  # pylint: disable=exec-used
    if page.stem == "your-model":
      assert namespace["norms"].shape == (128,)
      assert namespace["hg"].grads.shape == (1, 128)
      assert namespace["pool_probs"].shape == (len(namespace["ds"].train),)
      assert namespace["result"].history[-1]["test/accuracy"] > 0.5
    if page.stem == "own-loop":
      assert float(namespace["metrics"]["dvn/spearman"]) == float(namespace["metrics"]["dvn/spearman"])  # finite probe
      assert namespace["greats"].step == 40
