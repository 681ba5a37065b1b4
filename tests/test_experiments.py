"""Every experiment, the CLI and the notebooks run end to end on their quick settings."""

from __future__ import annotations

import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import metasel_experiments
from metasel import cli, runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=sorted(metasel_experiments.REGISTRY))
def quick_run(request, quick_runs) -> tuple[str, Path, str]:
  """Each experiment's quick run through the command line: its name, run folder and printed output."""
  return request.param, *quick_runs(request.param)


def test_experiment_quick_run_writes_results(quick_run):
  name, run_dir, printed = quick_run
  for filename in ("config.json", "metrics.jsonl", "summary.json"):
    assert (run_dir / filename).stat().st_size > 0
  assert list(run_dir.glob("*.png"))
  assert list((run_dir / "units").glob("*.pkl"))
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["seeds"] == list(metasel_experiments.get(name).get_config(quick=True).seeds)
  assert "results in" in printed
  assert cli.main(["report", str(run_dir)]) == 0


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finished_quick_run_resumes_to_the_same_summary_without_computing(quick_run, monkeypatch):
  """Run again on its finished folder, an experiment takes every unit's stored result and rewrites nothing else."""
  name, run_dir, _ = quick_run
  module = metasel_experiments.get(name)
  before, summary = _files(run_dir), json.loads((run_dir / "summary.json").read_text())
  store = runs.Units.run
  refuse = lambda key: lambda log: pytest.fail(f"unit {key!r} was computed again")
  monkeypatch.setattr(runs.Units, "run", lambda self, key, compute: store(self, key, refuse(key)))
  again = module.run(module.get_config(quick=True), run_dir)
  assert json.loads(json.dumps(runs.to_jsonable(again))) == summary
  after = _files(run_dir)
  assert after.keys() == before.keys()
  data_files = lambda files: {path: content for path, content in files.items() if not path.endswith(".png")}
  assert data_files(after) == data_files(before)  # figures are drawn again from the same summary


@pytest.mark.parametrize("quick_run", ["forecast-corpus"], indirect=True)
def test_forecast_command_on_a_finished_metasel_run(quick_run, capsys):
  """`metasel forecast RUN_DIR` forecasts every run of a finished run folder: with the forecaster that folder
  wrote, with one retrained on it, and with the shipped one."""
  _, run_dir, _ = quick_run
  runs_found = 16  # 2 datasets x 2 noise levels x 2 rates x 2 seeds
  cases = [
      (["--forecaster", str(run_dir / "forecaster.json"), "--features", "full"], "full features", "forecaster.json, trained on 16 runs"),
      (["--corpus", str(run_dir)], "curve features", f"retrained on {run_dir}"),
      ([], "curve features", "shipped with metasel"),
  ]
  for number, (extra, features, source) in enumerate(cases):
    plot = run_dir.parent / f"forecast{number}.png"
    assert cli.main(["forecast", str(run_dir), "--plot", str(plot), *extra]) == 0
    printed = capsys.readouterr().out
    assert printed.count("final accuracy at epoch") == runs_found
    assert features in printed and source in printed
    assert "dataset=mixture, hidden=16, lr=0.003, noise=0.0, seed=0" in printed
    assert plot.stat().st_size > 0
  assert cli.main(["forecast", str(run_dir), "--cutoff", "2", "--corpus", str(run_dir)]) == 2
  assert "trained on cutoffs 4..7" in capsys.readouterr().err


@pytest.mark.slow  # the transformer's training is in the CI set through test_any_model
def test_dvn_text_trains_the_transformer_on_token_ids(tmp_path):
  """`--model transformer` on AG News read as token ids, end to end."""
  module = metasel_experiments.get("dvn-text")
  config = dataclasses.replace(
      module.get_config(quick=True), dataset=module.AG_NEWS, model="transformer", seeds=(0,), noise_levels=(),
      samplers=("uniform", "dvn"),
  )
  module.check(config)
  samplers = module.run(config, tmp_path)["datasets"][module.AG_NEWS]["samplers"]
  assert set(samplers) == {"uniform", "dvn"}
  assert all(0.0 <= m["accuracy"]["mean"] <= 1.0 for m in samplers.values())


@pytest.mark.parametrize("name", ["mts-benchmark", "gsnr-sweep", "signals-report"])
def test_every_text_experiment_takes_the_transformer(name):
  """The other experiments that train on text load it as token ids for the transformer and accept it."""
  module = metasel_experiments.get(name)
  ag_news = metasel_experiments.shared_data("ag_news/test.csv")
  small = {"n_train": 200, "n_val": 64, "n_test": 64, "max_length": 16, "vocab_size": 500}
  spec, options = f"csv:{ag_news}", small
  if name in ("mts-benchmark", "signals-report"):  # they score weights against known corruption
    spec, options = f"corrupted:csv:{ag_news}", {**small, "n_real": 50, "n_synthetic": 150}
  config = dataclasses.replace(module.get_config(quick=True), dataset=spec, dataset_options=options, model="transformer")
  module.check(config)


def test_text_experiments_refuse_a_model_that_cannot_take_the_data():
  text = metasel_experiments.get("dvn-text")
  quick = text.get_config(quick=True)
  with pytest.raises(ValueError, match="model 'transformer' needs text read as token ids"):
    text.check(dataclasses.replace(quick, model="transformer"))  # the quick default is the generated mixture
  with pytest.raises(ValueError, match="unknown model 'rnn'"):
    text.check(dataclasses.replace(quick, model="rnn"))


def test_signals_report_finds_the_corrupted_samples(quick_runs):
  run_dir, _ = quick_runs("signals-report")
  summary = json.loads((run_dir / "summary.json").read_text())
  aucs = {k: v["mean"] for k, v in summary["auc"].items()}
  # With a quarter or more of the synthetic part corrupted, the loss must carry real information.
  assert aucs["loss"] > 0.6
  assert all(0.0 <= a <= 1.0 for a in aucs.values())


def test_signals_report_with_a_cnn_on_digits(tmp_path):
  module = metasel_experiments.get("signals-report")
  config = dataclasses.replace(module.get_config(quick=True), dataset="digits-synthetic", model="cnn", seeds=(0,))
  module.check(config)
  summary = module.run(config, tmp_path)
  assert summary["tier_auc"]["label_flip"]["loss"]["mean"] > 0.7  # flipped labels have high loss


def test_bad_input_is_reported_before_anything_is_written(tmp_path, capsys):
  assert cli.main(["run", "signals-report", "--quick", "--dataset", "nope", "--out", str(tmp_path)]) == 2
  assert "nope" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
  assert cli.main(["run", "no-such-experiment", "--out", str(tmp_path)]) == 2
  assert "unknown experiment 'no-such-experiment'" in capsys.readouterr().err
  assert cli.main(["run", "signals-report", "--quick", "--model", "cnn", "--out", str(tmp_path)]) == 2
  assert "model 'cnn' needs images" in capsys.readouterr().err
  assert cli.main(["run", "signals-report", "--quick", "--dataset", "sine", "--out", str(tmp_path)]) == 2
  assert "needs a classification dataset" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_existing_run_folder_is_kept(tmp_path, capsys):
  (tmp_path / "signals-report" / "t").mkdir(parents=True)
  (tmp_path / "signals-report" / "t" / "old.txt").write_text("keep")
  assert cli.main(["run", "signals-report", "--quick", "--out", str(tmp_path), "--run-id", "t"]) == 2
  assert "already exists" in capsys.readouterr().err
  assert (tmp_path / "signals-report" / "t" / "old.txt").read_text() == "keep"


# The MTS walkthrough (about 40 s) runs with -m slow; the CI set runs the others.
@pytest.mark.parametrize(
    "notebook",
    [pytest.param(p, marks=[pytest.mark.slow] if p.name == "mts_walkthrough.py" else []) for p in sorted((ROOT / "notebooks").glob("*.py"))],
    ids=lambda p: p.name,
)
def test_notebook_runs(notebook, monkeypatch):
  monkeypatch.setenv("METASEL_QUICK", "1")
  runpy.run_path(str(notebook), run_name="__main__")


def test_console_script_is_installed():
  out = subprocess.run([sys.executable, "-m", "metasel.cli", "list"], capture_output=True, text=True, check=True)
  assert "signals-report" in out.stdout.split()


@pytest.mark.slow
def test_signals_report_default_run_supports_the_readme(tmp_path):
  """The README's results section, from the full default run (about 20 s on 2 cores)."""
  module = metasel_experiments.get("signals-report")
  summary = module.run(module.get_config(), tmp_path)
  auc = {k: v["mean"] for k, v in summary["auc"].items()}
  assert auc["cos_class_centre"] < 0.3 and auc["knn_agreement"] < 0.3  # position features: best overall
  assert auc["dyn/loss_mean"] > auc["loss"] + 0.05  # dynamics beat the end-of-training loss
  tiers = summary["tier_auc"]
  assert tiers["near_duplicate"]["redundancy_max_cosine"]["mean"] > 0.95
  assert tiers["pure_noise"]["embedding_norm"]["mean"] > 0.95
  assert tiers["near_duplicate"]["loss"]["mean"] < 0.5  # loss points the wrong way on near-duplicates


def test_gsnr_sweep_rejects_bad_settings():
  module = metasel_experiments.get("gsnr-sweep")
  quick = module.get_config(quick=True)
  with pytest.raises(ValueError, match="batch size 4096 is larger than the training split"):
    module.check(dataclasses.replace(quick, batch_sizes=(8, 4096)))
  with pytest.raises(ValueError, match="num_batches must be at least 2"):
    module.check(dataclasses.replace(quick, num_batches=1))
  with pytest.raises(ValueError, match="needs a classification dataset"):
    module.check(dataclasses.replace(quick, dataset="sine", dataset_options={}))
  with pytest.raises(ValueError, match="pass flatten=True"):
    module.check(dataclasses.replace(quick, dataset="digits-synthetic", dataset_options={"flatten": False}))


@pytest.mark.slow
def test_gsnr_sweep_default_run_supports_the_readme(tmp_path):
  """The README's GSNR results, from the full default run (about 2 minutes on 2 cores)."""
  module = metasel_experiments.get("gsnr-sweep")
  summary = module.run(module.get_config(), tmp_path)
  for spec in ("mixture", "digits-synthetic"):
    s = summary["datasets"][spec]
    meta, model = s["slope"]["meta"], s["slope"]["model"]
    assert meta["mean"] - meta["half_width"] > 0  # the meta-gradient's GSNR rises with the batch size ...
    assert meta["mean"] + meta["half_width"] < 1  # ... but more slowly than for independent samples
    assert model["mean"] - model["half_width"] > 0.5
    traces = s["traces"]
    small, large = min(traces), max(traces)
    assert traces[small]["effective_batch_size_end"]["mean"] < traces[small]["effective_batch_size_start"]["mean"]
    assert traces[small]["max_weight_end"]["mean"] > traces[large]["max_weight_end"]["mean"]
