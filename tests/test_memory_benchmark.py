"""The memory benchmark's quick run reports every program's memory for both models, and the figures relate as
chunking, ghost norms and rematerialisation promise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark scripts' quick runs, like the other benchmarks', run with -m slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "transformer")
MTS_PROGRAMS = ("k1", "k1_remat", "k5", "k5_remat")


@pytest.fixture(scope="module")
def report():
  out = subprocess.run(
      [sys.executable, "benchmarks/memory.py", "--quick"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _figures(row: dict) -> dict[str, float]:
  """Every memory figure of a row by a dotted name."""
  chunks = row["settings"]["chunk_sizes"]
  variants = ("unchunked", *(f"chunk_{c}" for c in chunks))
  fixed = f"chunk_{chunks[-1]}"
  by_batch = row["by_batch"]
  figures = {
      "plain_step": row["plain_step_mb"],
      "ghost_norms": row["ghost_norms_mb"],
      "vmap_grads_output": row["vmap_grads_output_mb"],
      **{f"vmap_norms.{v}": row["vmap_norms_mb"][v] for v in variants},
      **{f"vmap_grads.{v}": row["vmap_grads_mb"][v] for v in variants},
      **{f"mts_step.{p}": row["mts_step_mb"][p] for p in MTS_PROGRAMS},
  }
  for tag in ("B", "4B"):
    figures[f"by_batch.ghost_norms.{tag}"] = by_batch["ghost_norms_mb"][tag]
    for v in ("unchunked", fixed):
      for kind in ("vmap_norms", "vmap_grads", "vmap_grads_workspace"):
        figures[f"by_batch.{kind}.{v}.{tag}"] = by_batch[f"{kind}_mb"][v][tag]
  return figures


def test_quick_run_reports_every_program_for_both_models(report):
  assert report["memory_source"] in ("device_peak", "compiled_analysis")
  assert report["quick"] is True and report["notes"]
  for key in ("backend", "device", "jax_version"):
    assert report[key], key
  for name in MODELS:
    row = report[name]
    assert row["model"] and row["num_params"] > 0
    assert row["by_batch"]["batches"] == {"B": row["settings"]["batch"], "4B": 4 * row["settings"]["batch"]}
    for figure, value in _figures(row).items():
      assert _positive_finite(value), f"{name}.{figure} = {value}"
    for ratio in ("per_sample_vmap_over_ghost", "remat_saving_k5", "mts_k5_over_k1"):
      assert math.isfinite(row["ratios"][ratio]), f"{name}.{ratio}"


@pytest.mark.parametrize("name", MODELS)
def test_chunking_bounds_per_sample_memory_by_the_chunk(report, name):
  by_batch = report[name]["by_batch"]
  fixed = f"chunk_{by_batch['chunk_size']}"
  for kind in ("vmap_norms_mb", "vmap_grads_mb", "vmap_grads_workspace_mb"):
    unchunked, chunked = by_batch[kind]["unchunked"], by_batch[kind][fixed]
    assert unchunked["4B"] > chunked["4B"], kind
    assert unchunked["4B"] > 3 * unchunked["B"], kind  # unchunked grows with the batch
  for kind in ("vmap_norms_mb", "vmap_grads_workspace_mb"):  # chunked stays flat in the batch
    assert by_batch[kind][fixed]["4B"] < 1.5 * by_batch[kind][fixed]["B"], kind
  # The per-sample gradients' own output is B x P values however they are chunked.
  assert by_batch["vmap_grads_output_mb"]["4B"] == pytest.approx(4 * by_batch["vmap_grads_output_mb"]["B"])
  assert by_batch["vmap_grads_mb"][fixed]["4B"] >= by_batch["vmap_grads_output_mb"]["4B"]
  row = report[name]
  sizes = row["settings"]["chunk_sizes"]
  assert row["vmap_norms_mb"][f"chunk_{sizes[0]}"] < row["vmap_norms_mb"][f"chunk_{sizes[-1]}"]  # smaller chunk, less


def test_ghost_norms_and_remat_save_what_they_should(report):
  for name in MODELS:
    row = report[name]
    assert row["ghost_norms_mb"] < row["vmap_norms_mb"]["unchunked"], name
    assert row["ratios"]["per_sample_vmap_over_ghost"] > 1, name
  # Rematerialising the Transformer's five unrolled steps keeps one step's activations instead of five.
  mts_step = report["transformer"]["mts_step_mb"]
  assert mts_step["k5"] > 2 * mts_step["k1"]
  assert mts_step["k5_remat"] < 0.5 * mts_step["k5"]
  assert report["transformer"]["ratios"]["remat_saving_k5"] > 0.5
