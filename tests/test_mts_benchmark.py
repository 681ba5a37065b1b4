"""The MTS benchmark: its quick run gives every method and claim, and bad settings are refused up front."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest

import metasel_experiments
from conftest import copy_of
from metasel import runs

MODULE = metasel_experiments.get("mts-benchmark")


@pytest.fixture(scope="module")
def quick_run(quick_runs, tmp_path_factory):
  """The session's quick run (shared with test_experiments), copied, and its summary as `run` returns it."""
  out_dir = copy_of(quick_runs("mts-benchmark")[0], tmp_path_factory.mktemp("mts-benchmark"))
  return MODULE.run(MODULE.get_config(quick=True), out_dir), out_dir


def test_quick_run_reports_every_method_and_claim(quick_run):
  summary, out_dir = quick_run
  assert summary["seeds"] == [0, 1]
  (result,) = summary["datasets"].values()
  assert set(result["methods"]) == set(MODULE.METHODS)
  for name, entry in result["methods"].items():
    assert 0.0 <= entry["accuracy"]["mean"] <= 1.0 and math.isfinite(entry["accuracy"]["half_width"]), name
    assert ("auc" in entry) == (name in MODULE.LEARNED)
  for name in MODULE.LEARNED:
    assert 0.0 <= result["methods"][name]["auc"]["mean"] <= 1.0
    assert result["methods"][name]["tier_auc"]
  assert result["strongest_baseline"] in MODULE.BASELINES
  assert [c for c, *_ in MODULE.CLAIMS] == list(result["claims"])
  assert all(c["verdict"] in MODULE.VERDICTS for c in result["claims"].values())
  assert "MTS beats the strongest baseline" in summary["table"]
  for name in ("config.json", "metrics.jsonl", "summary.json", "mts_benchmark.png"):
    assert (out_dir / name).stat().st_size > 0


def test_metrics_log_holds_the_per_epoch_history_of_every_run(quick_run):
  _, out_dir = quick_run
  records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
  config = MODULE.get_config(quick=True)
  runs = {(r["dataset"], r["method"], r["seed"]) for r in records}
  assert len(runs) == len(config.datasets) * len(MODULE.METHODS) * len(config.seeds)
  assert all("epoch" in r and "test/accuracy" in r for r in records)
  assert len(records) == len(runs) * config.epochs


def test_a_run_killed_before_its_last_unit_resumes_to_the_same_numbers(quick_run, tmp_path, monkeypatch):
  """Without its last unit (mts-features on the last seed, which reads the stored uniform run's dynamics), a run
  computes only that unit and ends with the summary and metrics lines of the uninterrupted run."""
  summary, finished = quick_run
  folder = tmp_path / "killed"
  shutil.copytree(finished, folder)
  stored = {path: pickle.loads(path.read_bytes()) for path in (folder / "units").glob("*.pkl")}
  last = max(stored, key=lambda path: stored[path]["index"])
  lines = (folder / "metrics.jsonl").read_text()
  cut = "".join(line + "\n" for line in stored[last]["lines"])
  assert stored[last]["key"] == "mixture/mts-features/seed=1" and lines.endswith(cut)
  last.unlink()  # killed while the unit ran: neither its file, its lines, nor the summary were written
  (folder / "metrics.jsonl").write_text(lines.removesuffix(cut))
  (folder / "summary.json").unlink()

  computed = []
  store = runs.Units.run
  counted = lambda key, compute: lambda log: (computed.append(key), compute(log))[1]
  monkeypatch.setattr(runs.Units, "run", lambda self, key, compute: store(self, key, counted(key, compute)))
  resumed = MODULE.run(MODULE.get_config(quick=True), folder)
  assert computed == ["mixture/mts-features/seed=1"]
  assert json.loads(json.dumps(runs.to_jsonable(resumed))) == json.loads(json.dumps(runs.to_jsonable(summary)))
  assert (folder / "summary.json").read_text() == (finished / "summary.json").read_text()
  assert (folder / "metrics.jsonl").read_text() == lines


def _quick(**changes):
  return dataclasses.replace(MODULE.get_config(quick=True), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "sine"}, "needs a classification dataset"),
        ({"dataset": "nope"}, "unknown dataset spec 'nope'"),
        ({"large_batch": 10_000}, "batch_size=10000 is larger than the training split"),
        ({"small_batch": 128, "large_batch": 64}, "large_batch=64 must exceed small_batch=128"),
        ({"seeds": ()}, "seeds must name at least one seed"),
        ({"datasets": ()}, "datasets must name at least one dataset"),
        ({"datasets": ("mixture", "mixture")}, "name a dataset twice"),
        ({"dataset_options": {"n_real": 50}}, "apply to `dataset`, which is not set"),
        ({"dataset": "corrupted:csv:/no/such/file.csv"}, "does not exist"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(changes, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    MODULE.check(_quick(**changes))


def test_a_dataset_without_corruption_is_refused(tmp_path):
  rows = "\n".join(f"{i % 2},text number {i} {'alpha' if i % 2 else 'beta'}" for i in range(200))
  path = tmp_path / "clean.csv"
  path.write_text(rows + "\n")
  with pytest.raises(ValueError, match="has only clean training samples"):
    MODULE.check(_quick(dataset=f"csv:{path}", dataset_options={"n_val": 64, "n_test": 40}))


def test_the_cli_dataset_replaces_the_list_with_its_options_on_top():
  config = _quick(dataset="digits-synthetic", dataset_options={"n_real": 120})
  plan = MODULE.dataset_plan(config)
  assert list(plan) == ["digits-synthetic"]
  assert plan["digits-synthetic"]["n_real"] == 120 and plan["digits-synthetic"]["flatten"] is True
  MODULE.check(config)


@pytest.mark.skipif(not Path(MODULE.AG_NEWS).is_file(), reason=f"AG News test split not found at {MODULE.AG_NEWS}")
def test_the_ag_news_mixture_loads_with_corrupted_tiers():
  config = _quick(datasets=(MODULE.AG_NEWS_SPEC,))
  MODULE.check(config)


@pytest.mark.slow
def test_default_run_supports_the_readme(tmp_path):
  """The README's MTS benchmark results, from the full default run (about 4 minutes on 2 cores)."""
  summary = MODULE.run(MODULE.get_config(), tmp_path)
  overall = {claim: value["verdict"] for claim, value in summary["overall"].items()}
  assert overall["MTS beats no selection"] == "holds"
  assert overall["new features improve MTS"] == "holds"
  assert overall["MTS beats the strongest baseline"] == "no significant difference"
  assert overall["larger batch improves MTS"] != "holds"
  for spec in ("mixture", "digits-synthetic"):
    methods = summary["datasets"][spec]["methods"]
    for name in ("mts-small", "mts-large", "mts-features"):
      assert methods[name]["auc"]["mean"] > 0.75  # MTS's weights rank corrupt samples low
    assert methods["l2rw"]["auc"]["mean"] < methods["mts-large"]["auc"]["mean"]
  mixture = summary["datasets"]["mixture"]["methods"]
  batch_for_model = mixture["uniform-large"]["accuracy"]["mean"] - mixture["uniform"]["accuracy"]["mean"]
  batch_for_mts = mixture["mts-large"]["accuracy"]["mean"] - mixture["mts-small"]["accuracy"]["mean"]
  assert batch_for_model > batch_for_mts + 0.05  # the large batch helps plain training far more
