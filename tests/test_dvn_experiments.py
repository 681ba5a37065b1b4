"""The DVN experiments: their bookkeeping, their checks, and their full runs (slow) against the README."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import metasel_experiments
from metasel_experiments import dvn_common

SINE = metasel_experiments.get("dvn-sine")
TEXT = metasel_experiments.get("dvn-text")


def test_updates_to_target_is_the_first_epoch_at_or_below_it():
  history = [{"step": 10, "test/loss": 0.5}, {"step": 20, "test/loss": 0.3}, {"step": 30, "test/loss": 0.2}]
  assert SINE.updates_to_target(history, 0.3) == 20
  assert SINE.updates_to_target(history, 0.25) == 30
  assert SINE.updates_to_target(history, 0.1) == float("inf")


def test_probes_are_averaged_per_epoch():
  probes = np.array([[1, 0.2, 1.0], [5, 0.4, 1.0], [11, np.nan, 1.0], [12, 0.9, 0.5], [25, 0.1, 0.0]])
  np.testing.assert_allclose(dvn_common.by_epoch(probes, 10, 3), [0.3, 0.9, 0.1])
  np.testing.assert_allclose(dvn_common.by_epoch(probes, 10, 4, column=2), [1.0, 0.75, 0.0, np.nan])


def test_claims_follow_the_interval_of_paired_differences():
  assert dvn_common.claim("a - b", [0.1, 0.12, 0.11], "x")["verdict"] == "holds"
  assert dvn_common.claim("a - b", [-0.1, -0.12, -0.11], "x")["verdict"] == "does not hold"
  assert dvn_common.claim("a - b", [np.nan, 0.1], "x")["difference"]["n"] == 1


def test_bad_settings_are_reported_before_training():
  quick = SINE.get_config(quick=True)
  with pytest.raises(ValueError, match="num_samples=500 is larger than the training pool"):
    SINE.check(dataclasses.replace(quick, sampler=dvn_common.SamplerSettings(num_samples=500)))
  with pytest.raises(ValueError, match="period must be an integer >= 1"):
    SINE.check(dataclasses.replace(quick, sampler=dvn_common.SamplerSettings(period=0)))
  with pytest.raises(ValueError, match="needs a regression dataset"):
    SINE.check(dataclasses.replace(quick, dataset="mixture", dataset_options={}))
  with pytest.raises(ValueError, match="samplers must be distinct names"):
    SINE.check(dataclasses.replace(quick, samplers=("uniform", "dvn-fast")))
  text = TEXT.get_config(quick=True)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TEXT.check(dataclasses.replace(text, dataset="csv:/no/such/file.csv"))
  with pytest.raises(ValueError, match="noise_levels must start with 0"):
    TEXT.check(dataclasses.replace(text, noise_levels=(0.1, 0.2)))
  with pytest.raises(ValueError, match="needs a classification dataset"):
    TEXT.check(dataclasses.replace(text, dataset="sine"))


@pytest.mark.slow
def test_dvn_sine_default_run_supports_the_readme(tmp_path):
  """The README's dvn-sine results, from the full default run (about a minute on 2 cores)."""
  summary = SINE.run(SINE.get_config(), tmp_path)
  samplers, claims = summary["samplers"], summary["claims"]
  assert samplers["uniform"]["reached_target"] == 5 and samplers["dvn"]["reached_target"] == 5
  spearman = samplers["dvn"]["spearman"]
  assert spearman["mean"] - spearman["half_width"] > 0.3  # the DVN predicts true contributions ...
  assert claims["DVN needs fewer updates than uniform"]["verdict"] == "does not hold"  # ... yet slows training
  sharp, soft = samplers["dvn, T=0.25"]["updates_to_target"], samplers["dvn, T=4"]["updates_to_target"]
  assert sharp["mean"] > soft["mean"]  # the more the DVN drives sampling, the more updates it takes
  assert samplers["dvn-unnormalised"]["reached_target"] < 5  # without the softmax some seeds never get there
  assert claims["softmax steadies the sampled pool"]["verdict"] == "no significant difference"  # not established


@pytest.mark.slow
def test_dvn_text_default_run_supports_the_readme(tmp_path):
  """The README's dvn-text results, from the full default run (about 2 minutes on 2 cores)."""
  summary = TEXT.run(TEXT.get_config(), tmp_path)
  overall = summary["overall"]
  assert overall["DVN beats uniform"]["verdict"] != "holds"
  assert overall["softmax normalisation helps"]["verdict"] == "holds"
  for result in summary["datasets"].values():
    assert result["samplers"]["uniform"]["accuracy"]["mean"] > 0.8
    assert abs(result["samplers"]["dvn"]["spearman"]["mean"]) < 0.2  # no usable prediction on text
  assert summary["noise_claims"]["50% noise lowers DVN accuracy"]["verdict"] == "holds"
