"""The influence-fidelity experiment: its metrics, its checks, and its quick run end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import metasel_experiments
from conftest import copy_of
from metasel_experiments import influence_common

FIDELITY = metasel_experiments.get("influence-fidelity")


def test_top_overlap_counts_the_shared_top_tenth():
  a = np.arange(20.0)
  assert FIDELITY.top_overlap(a, a) == 1.0
  assert FIDELITY.top_overlap(a, -a) == 0.0
  b = a.copy()
  b[19], b[0] = b[0], b[19]  # the top two of a become 18 and 0 in b
  assert FIDELITY.top_overlap(a, b) == 0.5


def test_checkpoint_metrics_compare_with_ghost_and_the_exact_contribution():
  rng = np.random.default_rng(0)
  ghost = rng.normal(size=50)
  flipped = ghost < -0.5  # low ghost marks the flipped samples
  scores = {
      "ghost": ghost, "contribution": 1e-3 * ghost, "lai": 2 * ghost, "lai-last": -ghost,
      "lai-means": ghost + 10.0, "lai-self": rng.normal(size=50),
  }
  m = FIDELITY.checkpoint_metrics(scores, flipped)
  assert set(m) == set(FIDELITY.SCORERS)
  assert "spearman_ghost" not in m["ghost"] and "spearman_contribution" not in m["contribution"]
  assert m["lai"]["spearman_ghost"] == pytest.approx(1.0) and m["lai"]["kendall_contribution"] == pytest.approx(1.0)
  assert m["lai"]["sign_agreement_ghost"] == 1.0 and m["lai-last"]["sign_agreement_ghost"] == 0.0
  assert m["lai-last"]["spearman_ghost"] == pytest.approx(-1.0) and m["lai-last"]["top10_ghost"] == 0.0
  assert m["lai-means"]["negative_share"] == 0.0 and m["ghost"]["negative_share"] == np.mean(ghost < 0)
  assert m["ghost"]["auroc_flipped"] == 1.0 and m["lai-last"]["auroc_flipped"] == 0.0
  assert np.isnan(FIDELITY.checkpoint_metrics(scores, np.zeros(50, bool))["lai"]["auroc_flipped"])


def test_noise_conditions_put_clean_first_and_symmetric_only_where_listed():
  config = dataclasses.replace(FIDELITY.get_config(), symmetric_settings=("mixture",))
  assert FIDELITY.conditions(config, "digits") == [("none", 0.0), ("cyclic", 0.2), ("cyclic", 0.4)]
  assert FIDELITY.conditions(config, "mixture")[3:] == [("symmetric", 0.2), ("symmetric", 0.4)]
  assert influence_common.condition_name("cyclic", 0.4) == "cyclic 40%" and influence_common.condition_name("none", 0.0) == "clean"


def test_claim_verdicts_follow_the_interval_against_the_threshold():
  assert FIDELITY.claim("s", "x", [0.95, 0.96, 0.97], 0.9, True, "-")["verdict"] == "holds"
  assert FIDELITY.claim("s", "x", [0.5, 0.55, 0.6], 0.9, True, "-")["verdict"] == "does not hold"
  assert FIDELITY.claim("s", "x", [0.001, 0.002, 0.0], 0.01, False, "-")["verdict"] == "holds"
  assert FIDELITY.claim("s", "x", [0.0, 0.5], 0.01, False, "-")["verdict"] == "no significant difference"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"settings": ("mixture", "cifar")}, "unknown settings"),
        ({"settings": ()}, "unknown settings"),
        ({"symmetric_settings": ("imagenet",)}, "unknown settings"),
        ({"noise_levels": (0.2, 0.4)}, "noise_levels must start with 0"),
        ({"noise_levels": (0.0, 1.5)}, "noise_levels must start with 0"),
        ({"checkpoints": (1, 5)}, r"checkpoints must be increasing epochs in \[1, epochs=2\]"),
        ({"checkpoints": (2, 1)}, "checkpoints must be increasing"),
        ({"score_batches": 20}, "training split has 160"),
        ({"score_val_size": 500}, "score_val_size=500 is larger than the validation split"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seeds": ()}, "seeds must name at least one seed"),
        ({"mlp_hidden": (0,)}, "mlp_hidden must be positive layer widths"),
    ],
)
def test_bad_config_is_reported_before_compute(changes, message):
  with pytest.raises(ValueError, match=message):
    FIDELITY.check(dataclasses.replace(FIDELITY.get_config(quick=True), **changes))


def test_quick_run_writes_every_scorer_metric_and_the_claims(quick_runs, tmp_path):
  """The session's quick run (shared with test_experiments), copied, and its summary as `run` returns it."""
  config = FIDELITY.get_config(quick=True)
  FIDELITY.check(config)
  tmp_path = copy_of(quick_runs("influence-fidelity")[0], tmp_path)
  summary = FIDELITY.run(config, tmp_path)
  for name in ("config.json", "metrics.jsonl", "summary.json", "influence_fidelity.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == list(config.seeds)

  result = summary["settings"]["mixture"]
  assert set(result["timing"]) == set(FIDELITY.TIMED)
  assert all(t["ms"]["n"] == len(config.seeds) and t["ms"]["mean"] > 0 for t in result["timing"].values())
  assert list(result["conditions"]) == ["clean", "cyclic 40%", "symmetric 40%"]
  for cond, c in result["conditions"].items():
    assert list(c["checkpoints"]) == ["epoch 1", "epoch 2"]
    assert c["outer_vs_pairwise_max"] < 1e-4  # the outer form computes the pairwise numbers
    last = c["checkpoints"]["epoch 2"]
    assert set(last) == set(FIDELITY.SCORERS)
    assert set(last["lai"]) == set(FIDELITY.METRICS)
    # At the learning rate's step the exact contribution is first order: ghost ranks as it does.
    assert last["ghost"]["spearman_contribution"]["mean"] > 0.9
    assert 0.0 <= last["lai"]["negative_share"]["mean"] <= 1.0
    assert (last["lai"]["auroc_flipped"]["n"] == 0) == (cond == "clean")  # no flipped labels, no AUROC
    assert c["best_layer_set"] in FIDELITY.LAYER_SETS
    verdicts = {claim["verdict"] for claim in c["claims"].values()}
    assert verdicts <= {"holds", "does not hold", "no significant difference"}

  claims = summary["claims"]
  assert set(claims["lai_ranks_like_ghost"]["mixture"]["cyclic 40%"]["spearman"]) == {"epoch 1", "epoch 2"}
  assert claims["lai_cheaper_than_ghost"]["mixture"]["time_ratio"]["n"] == len(config.seeds)
  assert set(claims["sign_rule_rarely_fires_late"]["mixture"]) == set(result["conditions"])
  assert "LAI ranks like ghost at epoch 2" in summary["table"]


@pytest.mark.slow
def test_default_run_supports_the_readme(tmp_path):
  """The README's influence-fidelity results, from the full default run (about 10 minutes on 2 cores)."""
  summary = FIDELITY.run(FIDELITY.get_config(), tmp_path)
  ranks, fires = summary["claims"]["lai_ranks_like_ghost"], summary["claims"]["sign_rule_rarely_fires_late"]
  for setting in ("mixture", "digits"):  # LAI ranks like ghost influence on the small MLPs ...
    for condition in ranks[setting].values():
      assert all(v != "does not hold" for v in condition["verdicts"].values())
  for condition in ranks["agnews-transformer"].values():  # ... but not late in training on the Transformer
    assert condition["verdicts"]["LAI ranks like ghost at epoch 8"] == "does not hold"
  for per_condition in fires.values():  # the sign rule fires for a large share of samples everywhere
    assert all(c["verdict"] == "does not hold" for c in per_condition.values())
  assert summary["claims"]["lai_cheaper_than_ghost"]["agnews-transformer"]["verdict"] == "holds"
