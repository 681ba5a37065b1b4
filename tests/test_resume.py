"""The command line's `--resume`, `--set` and run units: a killed run resumes to the same numbers, losing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metasel_experiments as experiments
from metasel import cli, data, runs
from metasel_experiments import shared_data

RUN = ["run", "signals-report", "--quick", "--seeds", "0", "1", "2", "3"]


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _summary(folder: Path) -> dict:
  return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("uninterrupted")
  assert cli.main([*RUN, "--out", str(out), "--run-id", "whole"]) == 0
  return out / "signals-report" / "whole"


def _kill_after_first_unit(out: Path) -> Path:
  """Start the run in a real subprocess and SIGKILL it once its first unit is stored."""
  folder = out / "signals-report" / "killed"
  env = {**os.environ, "CI": "true"}
  process = subprocess.Popen(
      [sys.executable, "-m", "metasel.cli", *RUN, "--out", str(out), "--run-id", "killed"],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
  )
  deadline = time.monotonic() + 240
  while not list((folder / "units").glob("*.pkl")):
    if process.poll() is not None:
      pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail("the run stored no unit within 240 s")
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  return folder


def test_killed_run_resumes_to_the_same_summary_and_keeps_what_was_written(tmp_path, uninterrupted):
  folder = _kill_after_first_unit(tmp_path)
  assert not (folder / "summary.json").exists(), "the run finished before the kill; nothing was tested"
  before = _files(folder)
  assert len([name for name in before if name.startswith("units/")]) == 1

  assert cli.main(["run", "signals-report", "--resume", str(folder)]) == 0
  after = _files(folder)
  for name, content in before.items():
    if name == "metrics.jsonl":
      assert after[name].startswith(content), "lines written before the kill were changed"
    else:
      assert after[name] == content, f"{name} was overwritten"
  assert _summary(folder) == _summary(uninterrupted)
  # Every finished unit's lines exactly once, in the order of an uninterrupted run.
  assert (folder / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_resume_takes_the_started_settings_and_refuses_others(tmp_path, uninterrupted, capsys):
  assert cli.main(["run", "signals-report", "--resume", str(uninterrupted), "--seeds", "3"]) == 2
  assert "--resume takes the settings and folder the run was started with; drop --seeds" in capsys.readouterr().err
  assert cli.main(["run", "signals-report", "--resume", str(uninterrupted), "--out", str(tmp_path)]) == 2
  assert "drop --out" in capsys.readouterr().err
  assert cli.main(["run", "mts-benchmark", "--resume", str(uninterrupted)]) == 2
  assert "is a run of 'signals-report', not 'mts-benchmark'" in capsys.readouterr().err
  assert cli.main(["run", "signals-report", "--resume", str(tmp_path)]) == 2
  assert "no command.json" in capsys.readouterr().err
  # A finished run resumes to itself without computing or writing anything.
  before = _files(uninterrupted)
  assert cli.main(["run", "signals-report", "--resume", str(uninterrupted)]) == 0
  assert _files(uninterrupted) == before


def test_set_rejects_a_value_its_field_does_not_take(tmp_path, capsys):
  assert cli.main(["run", "gsnr-sweep", "--quick", "--set", "warmup.epochs=x", "--out", str(tmp_path)]) == 2
  assert "warmup.epochs expects an int, got 'x'" in capsys.readouterr().err
  assert cli.main(["run", "gsnr-sweep", "--quick", "--set", "no_such_field=1", "--out", str(tmp_path)]) == 2
  assert "no_such_field" in capsys.readouterr().err
  assert not (tmp_path / "gsnr-sweep").exists()  # rejected before any folder is made


def test_set_overrides_typed_fields_and_nested_dataset_options(tmp_path, capsys):
  path = shared_data("yelp_polarity/textfooler_yelp_1k.txt")
  if not path.exists():
    pytest.skip(f"{path} is not available")
  base = ["run", "gsnr-sweep", "--quick", "--dataset", f"corrupted:lines:{path}", "--out", str(tmp_path)]
  assert cli.main([*base, "--run-id", "missing"]) == 2
  assert "--set dataset_options.n_real=300" in capsys.readouterr().err
  assert not (tmp_path / "gsnr-sweep" / "missing").exists()  # rejected before any folder is made
  # The options reach the loader: the experiment's own check loads the data with them.
  overrides = ["dataset_options.n_real=60", "dataset_options.n_synthetic=120", "seeds=0", "trace.epochs=1"]
  args = cli._parser().parse_args([*base, *(item for o in overrides for item in ("--set", o))])
  module = experiments.get("gsnr-sweep")
  config = cli._configure(module, args)
  module.check(config)
  assert config.dataset_options == {"n_real": 60, "n_synthetic": 120}
  assert config.seeds == (0,) and config.trace.epochs == 1 and config.warmup.epochs == 1  # others keep --quick's
  assert len(data.load(config.dataset, seed=0, **config.dataset_options).train) == 180


def test_units_append_lines_of_a_unit_stored_before_its_lines(tmp_path):
  """A run killed between storing a unit and appending its lines gets them on resume, once."""
  metrics, units = runs.open_run(tmp_path, {"a": 1})
  assert units.run("first", lambda log: (log({"x": 1}), 7)[1]) == 7
  assert units.run("second", lambda log: (log({"x": 1}), 8)[1]) == 8  # the same line twice is kept twice
  lines = (tmp_path / "metrics.jsonl").read_text()
  assert lines.count('{"x": 1}') == 2
  (tmp_path / "metrics.jsonl").write_text(lines.splitlines()[0] + "\n")  # as if killed before the second append
  _, units = runs.open_run(tmp_path, {"a": 1})
  assert (tmp_path / "metrics.jsonl").read_text() == lines
  _, units = runs.open_run(tmp_path, {"a": 1})
  assert (tmp_path / "metrics.jsonl").read_text() == lines  # not appended twice
  assert units.run("first", lambda log: pytest.fail("a finished unit was computed again")) == 7
  with pytest.raises(ValueError, match="started with another configuration"):
    runs.open_run(tmp_path, {"a": 2})


def test_a_line_cut_short_by_a_kill_is_kept_aside_and_the_log_rebuilt(tmp_path):
  _, units = runs.open_run(tmp_path, {"a": 1})
  units.run("first", lambda log: log({"x": 1, "y": [1, 2, 3]}))
  whole = (tmp_path / "metrics.jsonl").read_text()
  (tmp_path / "metrics.jsonl").write_text(whole + '{"x": 2, "y": [1')  # a unit's append cut short
  runs.open_run(tmp_path, {"a": 1})
  assert (tmp_path / "metrics.jsonl").read_text() == whole
  assert (tmp_path / "metrics.jsonl.before-resume-1").read_text() == whole + '{"x": 2, "y": [1'
  assert runs.MetricsLog(tmp_path / "metrics.jsonl").read() == [{"x": 1, "y": [1, 2, 3]}]
