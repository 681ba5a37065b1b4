"""Fixtures shared by test modules."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import jax
import pytest

from metasel import cli


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop JAX's compiled programs after each test module: a session that keeps the thousands the suite compiles
  alive exhausts the process's memory mappings (vm.max_map_count) and crashes in XLA's compiler."""
  yield
  jax.clear_caches()


@pytest.fixture(scope="session")
def quick_runs(tmp_path_factory):
  """`quick_runs(name)`: the experiment's quick run through the command line, made once per session; its run
  folder and printed output. Tests that change the folder take `copy_of` it."""
  made: dict[str, tuple[Path, str]] = {}

  def quick_run(name: str) -> tuple[Path, str]:
    if name not in made:
      out, printed = tmp_path_factory.mktemp(name), io.StringIO()
      with contextlib.redirect_stdout(printed):
        assert cli.main(["run", name, "--quick", "--out", str(out), "--run-id", "t"]) == 0
      made[name] = (out / name / "t", printed.getvalue())
    return made[name]

  return quick_run


# Checks the CI set keeps in a cheaper form, run with -m slow: the transformer's eager (op-by-op) variants, whose
# jitted variants stay; the transformer through every method and one DVN step (the MLP, CNN, NNX and function
# models stay); the whole epoch eager against jitted. The sharded programs on 8 devices run in the CI set, in a
# process of their own.
SLOW_VARIANTS = (
    "eager-transformer]",
    "test_fit_runs_every_method_on_the_model[transformer]",
    "test_step_factors_of_one_sample_step_every_taped_layer_by_its_gradient[transformer]",
    "test_epoch_jit_equals_eager",
)


def pytest_collection_modifyitems(items):
  for item in items:
    if item.nodeid.endswith(SLOW_VARIANTS):
      item.add_marker(pytest.mark.slow)


def copy_of(run_dir: Path, into: Path) -> Path:
  """A copy of a run folder, to change without touching the shared one."""
  target = into / run_dir.name
  shutil.copytree(run_dir, target)
  return target
