"""Sharded and multi-process runs, each in processes of their own so that this suite keeps one device.

The 8-device cases (`parallel_cases.py`) need JAX_NUM_CPU_DEVICES=8 before JAX starts; the multi-process
case starts 2 workers of 2 CPU devices each that join with `jax.distributed` on localhost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metasel import train
from multiprocess_setting import CONFIG, MODEL, dataset, method

TESTS = Path(__file__).parent


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", "CI": "true"}


def _run_cases(marker: str) -> None:
  process = subprocess.run(
      [sys.executable, "-m", "pytest", str(TESTS / "parallel_cases.py"), "-q", "-p", "no:cacheprovider", "-m", marker],
      env=_env(8), capture_output=True, text=True, timeout=900, cwd=TESTS.parent,
  )
  assert process.returncode == 0, process.stdout[-6000:] + process.stderr[-3000:]
  assert " passed" in process.stdout and "skipped" not in process.stdout


def test_sharded_programs_on_8_devices_equal_one_device():
  _run_cases("not slow")


@pytest.mark.slow
def test_command_line_on_8_devices_gives_the_one_device_numbers():
  _run_cases("slow")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _close_histories(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("two-processes")
  port = _free_port()
  workers = [
      subprocess.Popen(
          [sys.executable, str(TESTS / "multiprocess_worker.py"), str(port), "2", str(index), str(out)],
          env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=TESTS,
      )
      for index in range(2)
  ]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail("the 2-process run did not finish within 600 s")
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-5000:]
  return out


def test_two_processes_on_four_devices_train_like_one(two_process_run):
  result = json.loads((two_process_run / "result.json").read_text())
  assert result["devices"] == 4 and result["processes"] == 2
  assert result["local_rows"] == list(range(8))  # process 0's block of the 16 rows
  assert result["global_sum"] == sum(range(16))  # the global array holds both processes' rows
  one = train.fit(MODEL, dataset(), CONFIG, method())
  _close_histories(result["history"], one.history)


def test_checkpoint_of_two_processes_restores_on_one_device(two_process_run):
  longer = dataclasses.replace(CONFIG, epochs=3)
  resumed = train.fit(MODEL, dataset(), longer, method(), checkpoint_dir=two_process_run / "checkpoints")
  whole = train.fit(MODEL, dataset(), longer, method())
  _close_histories(resumed.history, whole.history)
