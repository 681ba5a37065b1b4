"""The influence-selection experiment: its quick run reports every method and claim, its statistics, and its checks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import metasel_experiments
from conftest import copy_of
from metasel_experiments import influence_common as common
from metasel import stats, train

MODULE = metasel_experiments.get("influence-selection")


@pytest.fixture(scope="module")
def quick_run(quick_runs, tmp_path_factory):
  """The session's quick run (shared with test_experiments), copied, and its summary as `run` returns it."""
  out_dir = copy_of(quick_runs("influence-selection")[0], tmp_path_factory.mktemp("influence-selection"))
  return MODULE.run(MODULE.get_config(quick=True), out_dir), out_dir


def test_quick_run_reports_every_method_noise_and_claim(quick_run):
  summary, out_dir = quick_run
  config = MODULE.get_config(quick=True)
  assert summary["seeds"] == list(config.seeds)
  conds = [common.condition_name(*c) for c in MODULE.conditions(config)]
  assert list(summary["settings"]) == list(config.settings)
  for setting, per_condition in summary["settings"].items():
    assert list(per_condition) == conds
    for cond, result in per_condition.items():
      methods = result["methods"]
      assert list(methods) == list(MODULE.METHODS)
      for name, m in methods.items():
        for key in ("last", "best_val"):
          assert 0.0 <= m[key]["mean"] <= 1.0 and math.isfinite(m[key]["half_width"]), (setting, cond, name)
        assert len(m["test_curve"]) == config.epochs  # top-k and GREATS are read at the same steps
        assert ("precision" in m) == (name != "uniform")
        assert m["seconds_median"] > 0
      # The oracle drops exactly the flipped samples; top-k keeps half of each candidate batch.
      assert methods["oracle"]["precision"]["mean"] == 1.0 and methods["oracle"]["recall"]["mean"] == 1.0
      assert methods["ghost-topk"]["drop_rate"]["mean"] == pytest.approx(0.5)
      lai_rates = [r["drop_rate"] for r in summary["per_seed"][setting][cond]["lai-sign"]]
      assert result["random_drop_rate"] == pytest.approx(np.mean(lai_rates))
      assert set(result["differences"]) == {"uniform", "ghost-sign"}
      assert "uniform" not in result["differences"]["uniform"]
      assert set(result["claims"]) == set(MODULE.METRICS)
  for per_condition in summary["claims"].values():
    assert list(per_condition) == conds
    for result in per_condition.values():
      assert [name for name, *_ in MODULE.CLAIMS] == list(result["claims"])
      assert all(c["verdict"] in MODULE.VERDICTS for c in result["claims"].values())
      assert result["answer"].split(" ")[0] in ("supported:", "contradicted", "not")
  assert "LAI selection beats ghost selection" in summary["table"]
  for name in ("config.json", "metrics.jsonl", "summary.json", "influence_selection.png"):
    assert (out_dir / name).stat().st_size > 0


def test_metrics_log_holds_every_runs_epochs(quick_run):
  _, out_dir = quick_run
  config = MODULE.get_config(quick=True)
  records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
  runs = {(r["setting"], r["noise"], r["level"], r["method"], r["seed"]) for r in records}
  assert len(runs) == len(config.settings) * len(MODULE.conditions(config)) * len(MODULE.METHODS) * len(config.seeds)
  candidate = sum(1 for r in runs if r[3] in MODULE.CANDIDATE_METHODS)
  assert len(records) == (len(runs) - candidate) * config.epochs + candidate * 2 * config.epochs
  last_step: dict[tuple, int] = {}
  for r in records:
    key = (r["setting"], r["noise"], r["level"], r["method"], r["seed"])
    last_step[key] = max(last_step.get(key, 0), r["step"])
  assert len(set(last_step.values())) == 1  # every run takes the same number of steps


def test_candidate_runs_are_read_on_the_batch_epoch_grid():
  history = [{"step": s, "val/accuracy": 0.1 * s, "test/accuracy": 0.0} for s in (5, 10, 15, 20)]
  assert [r["step"] for r in MODULE.on_grid(history, 10)] == [10, 20]
  assert MODULE.on_grid(history, 5) == history


def test_tost_tells_equivalence_from_a_lack_of_evidence():
  rng = np.random.default_rng(0)
  tight = rng.normal(0.0, 0.002, 10)
  assert stats.tost(tight, 0.01)["equivalent"]
  assert not stats.tost(rng.normal(0.0, 0.05, 5), 0.01)["equivalent"]  # too noisy to say
  assert not stats.tost(tight + 0.03, 0.01)["equivalent"]  # a real difference beyond the margin
  assert math.isnan(stats.tost([0.001], 0.01)["p"])
  assert MODULE.paired_claim("a - b", tight, "-", 0.01)["verdict"] == "equivalent"
  assert MODULE.paired_claim("a - b", tight + 0.03, "-", 0.01)["verdict"] == "holds"
  assert MODULE.paired_claim("a - b", -tight - 0.03, "-", 0.01)["verdict"] == "does not hold"
  assert MODULE.paired_claim("a - b", rng.normal(0.0, 0.05, 5), "-", 0.01)["verdict"] == "inconclusive"


def test_the_answer_to_claim_b_follows_its_two_verdicts():
  def claims(vanilla, ghost):
    return {MODULE.ANSWER_CLAIMS[0]: {"verdict": vanilla}, MODULE.ANSWER_CLAIMS[1]: {"verdict": ghost}}

  assert MODULE.answer(claims("holds", "holds")).startswith("supported")
  assert MODULE.answer(claims("holds", "equivalent")).startswith("contradicted")
  assert MODULE.answer(claims("does not hold", "inconclusive")).startswith("contradicted")
  assert MODULE.answer(claims("holds", "inconclusive")).startswith("not established")


def _quick(**changes):
  return dataclasses.replace(MODULE.get_config(quick=True), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"settings": ("mixture", "imagenet")}, "unknown settings"),
        ({"noise_kinds": ("cyclic", "pairflip")}, "unknown noise kind"),
        ({"noise_levels": (0.0, 0.4)}, "noise_levels must be distinct fractions"),
        ({"methods": ("uniform", "lai-sign", "lai-fast")}, "methods must be distinct names"),
        ({"methods": ("lai-sign", "ghost-sign")}, "must include 'uniform'"),
        ({"methods": ("uniform", "random-drop")}, "must include 'lai-sign'"),
        ({"epochs": 1}, "epochs must be an integer >= 2"),
        ({"margin": 0.0}, "margin must be an accuracy difference"),
        ({"batch_size": 32}, "expected twice as many"),  # 160 samples: 5 steps of 32, 2 of 64
        ({"batch_size": 100}, "batch_size=200 is larger than the training split"),
        ({"kind_settings": {"symmetric": ("mixture",)}, "noise_kinds": ("cyclic",)}, "not among noise_kinds"),
        ({"overrides": {"imagenet": {}}}, "overrides name unknown settings"),
        ({"settings": ("mixture", "digits"), "noise_kinds": ("cyclic",), "kind_settings": {"cyclic": ("mixture",)}},
         "run under no noise kind"),
        ({"seeds": ()}, "seeds must name at least one seed"),
        ({"mlp_hidden": (0,)}, "mlp_hidden must be integers"),
    ],
)
def test_bad_settings_are_reported_before_training(changes, message, monkeypatch):
  monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("check trained a model"))
  with pytest.raises(ValueError, match=message):
    MODULE.check(_quick(**changes))


def test_default_config_passes_its_checks_without_training(monkeypatch):
  monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("check trained a model"))
  MODULE.check(MODULE.get_config())
  MODULE.check(_quick(noise_kinds=("cyclic", "symmetric"), kind_settings={"symmetric": ("mixture",)}))


@pytest.mark.slow
def test_default_run_supports_the_readme(tmp_path):
  """The README's influence-selection results, from the full default run (about 16 minutes on 2 cores)."""
  summary = MODULE.run(MODULE.get_config(), tmp_path)
  last = summary["claims"]["last"]
  verdict = lambda noise, name: last[noise]["claims"][name]["verdict"]  # noqa: E731
  for noise in last:  # selection by LAI beats vanilla training, by information rather than fewer samples
    assert verdict(noise, "LAI selection beats vanilla training") == "holds"
    assert verdict(noise, "LAI beats dropping at random at its rate") == "holds"
  assert last["cyclic 40%"]["answer"].startswith("supported")  # claim (b) in the paper's own setting ...
  for noise in ("symmetric 20%", "symmetric 40%"):  # ... but LAI and ghost selection are equivalent beyond it
    assert verdict(noise, "LAI selection beats ghost selection") == "equivalent"
