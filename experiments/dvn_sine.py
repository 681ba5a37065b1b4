"""DVN on noisy sine regression: updates to a target loss, and how well the DVN predicts contributions.

Command:   metasel run dvn-sine            (about a minute on a 2-core CPU)
Quick:     metasel run dvn-sine --quick    (seconds; used by the tests)

The synthetic task of "Learning to Value Data: A Meta-Learned Sampler" (N = 1000 noisy sine samples,
noise sigma 0.1, an MLP 2 x 128, Adam 1e-3, 50 epochs). Samplers, all on the same data, model and
optimiser per seed: uniform epochs, gradient-norm sampling, the DVN (T = 10, K = 20, softmax temperature
1 on scores in units of the contributions' spread), the DVN without the softmax
(`dvn.sampling_probs(..., "none")`), and the DVN at the further softmax temperatures `temperatures`.
The DVN's contributions are measured on the validation split's batches, so every loss reported here is
the held-out test split's.

Per seed and sampler: the test loss after every epoch, and the number of updates (steps) until the test
loss first reaches `target_loss` (3 sigma^2 by default, where sigma^2 = 0.01 is the lowest loss reachable).
For the DVNs: at every meta-update the Spearman correlation between the DVN's predictions and the K
true contributions (before that update's fit), and between the first-order estimates and the true ones;
and the sampler's effective pool size 1 / sum p_i^2 at every step.

Claims tested (paired per seed, 95% intervals, verdict "holds" / "does not hold" / "no significant
difference"): the DVN reaches the target in fewer updates than uniform and gradient-norm sampling (the
paper: 30% fewer), also at its best temperature (picked by the same test losses, which favours it); its
Spearman with true contributions improves over epochs (last tenth of training minus the first tenth);
the softmax matters (Spearman and the stability of the effective pool size with and without it).

Writes config.json, metrics.jsonl (per-epoch records), summary.json and dvn_sine.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from metasel import data, models, runs, train
from metasel_experiments import ci_text, dvn_common, interval
from metasel_experiments.dvn_common import SamplerSettings, claim, nanmean

NAME = "dvn-sine"
SAMPLERS = ("uniform", "grad-norm", "dvn", "dvn-unnormalised")


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the experiment; `get_config(quick=True)` shrinks everything for tests.

  `dataset` is a regression dataset spec with `dataset_options` for its loader.
  """

  dataset: str = "sine"
  dataset_options: dict = dataclasses.field(
      default_factory=lambda: {"n_train": 1000, "n_val": 200, "n_test": 200, "noise": 0.1}
  )
  samplers: tuple[str, ...] = SAMPLERS
  hidden: tuple[int, ...] = (128, 128)
  epochs: int = 50
  batch_size: int = 32
  val_batch_size: int = 64
  learning_rate: float = 1e-3
  sampler: SamplerSettings = SamplerSettings()
  temperatures: tuple[float, ...] = (0.25, 4.0)
  target_loss: float = 0.03
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      dataset_options={"n_train": 200, "n_val": 64, "n_test": 64, "noise": 0.1},
      hidden=(32, 32),
      epochs=4,
      val_batch_size=32,
      learning_rate=1e-2,
      sampler=SamplerSettings(period=3, num_samples=8),
      temperatures=(4.0,),
      target_loss=0.6,
      seeds=(0, 1),
  )


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  if not config.hidden or any(not isinstance(w, int) or w < 1 for w in config.hidden):
    raise ValueError(f"hidden must be positive layer widths, got {config.hidden!r}")
  if not (isinstance(config.target_loss, (int, float)) and config.target_loss > 0):
    raise ValueError(f"target_loss must be a positive number, got {config.target_loss!r}")
  dataset = data.load(config.dataset, seed=config.seeds[0], **config.dataset_options)
  if dataset.task != "regression":
    raise ValueError(f"{NAME} needs a regression dataset, got classification data {config.dataset!r}")
  dvn_common.check_samplers(config.samplers, config.sampler, dataset, dvn_common.train_config(config, config.seeds[0]))
  if config.temperatures and "dvn" not in config.samplers:
    raise ValueError("temperatures are extra runs of the DVN; expected 'dvn' among samplers")
  for t in config.temperatures:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < np.inf:
      raise ValueError(f"temperatures must be positive finite numbers, got {config.temperatures!r}")


def updates_to_target(history: list[dict[str, Any]], target: float) -> float:
  """Steps taken when the test loss is first at or below `target` (checked after each epoch); inf if never."""
  for record in history:
    if record["test/loss"] <= target:
      return float(record["step"])
  return float("inf")


def _saving(steps: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per-seed fraction of updates saved, 1 - steps / reference, over seeds where both reached the target."""
  both = np.isfinite(steps) & np.isfinite(reference)
  return 1.0 - steps[both] / reference[both]


def summarise(config: Config, results: dict[str, list[dict]]) -> dict[str, Any]:
  """Per-sampler intervals over seeds, the claims and their verdicts."""
  tenth = max(1, config.epochs // 10)
  samplers = {}
  for name, rows in results.items():
    steps = np.array([r["updates_to_target"] for r in rows])
    entry = {
        "final_test_loss": interval([r["test_loss"][-1] for r in rows]),
        "best_test_loss": interval([min(r["test_loss"]) for r in rows]),
        "updates_to_target": interval(steps),
        "reached_target": int(np.isfinite(steps).sum()),
        "test_loss_curve": [interval(col)["mean"] for col in np.array([r["test_loss"] for r in rows]).T],
        "pool_ess_cv": interval([r["pool_ess_cv"] for r in rows]),
    }
    if name.startswith("dvn"):
      curves = np.array([r["spearman_by_epoch"] for r in rows])  # (seeds, epochs)
      entry["spearman"] = interval([nanmean(c) for c in curves])
      entry["spearman_first"] = interval([nanmean(c[:tenth]) for c in curves])
      entry["spearman_last"] = interval([nanmean(c[-tenth:]) for c in curves])
      entry["spearman_curve"] = [nanmean(col) for col in curves.T]
      entry["first_order_spearman"] = interval([r["first_order_spearman"] for r in rows])
    samplers[name] = entry

  def steps(name):
    return np.array([r["updates_to_target"] for r in results[name]])

  claims = {}
  if {"dvn", "uniform"} <= set(results):
    claims["DVN needs fewer updates than uniform"] = claim(
        "1 - dvn / uniform updates", _saving(steps("dvn"), steps("uniform")), "30% fewer"
    )
  if {"dvn", "grad-norm"} <= set(results):
    claims["DVN needs fewer updates than grad-norm"] = claim(
        "1 - dvn / grad-norm updates", _saving(steps("dvn"), steps("grad-norm")), "30% fewer"
    )
  tempered = [name for name in results if name.startswith("dvn, T=")]
  if tempered and "uniform" in results:
    reached = lambda name: np.nanmedian(steps(name)) if np.isfinite(steps(name)).any() else np.inf
    best = min(["dvn", *tempered], key=reached)
    claims["DVN at best temperature: fewer updates"] = claim(
        f"1 - {best} / uniform updates", _saving(steps(best), steps("uniform")), "30% fewer"
    )
  if "dvn" in results:
    curves = np.array([r["spearman_by_epoch"] for r in results["dvn"]])
    claims["DVN's Spearman improves over epochs"] = claim(
        "last - first tenth of epochs",
        [nanmean(c[-tenth:]) - nanmean(c[:tenth]) for c in curves], "improves",
    )
  if {"dvn", "dvn-unnormalised"} <= set(results):
    spear = lambda name: np.array([nanmean(r["spearman_by_epoch"]) for r in results[name]])
    claims["softmax raises the DVN's Spearman"] = claim(
        "dvn - dvn-unnormalised", spear("dvn") - spear("dvn-unnormalised"), "collapses without softmax"
    )
    cv = lambda name: np.array([r["pool_ess_cv"] for r in results[name]])
    claims["softmax steadies the sampled pool"] = claim(
        "CV(ESS) unnormalised - softmax", cv("dvn-unnormalised") - cv("dvn"), "spikes without softmax"
    )
  return {"samplers": samplers, "claims": claims}


def format_table(summary: dict[str, Any]) -> str:
  """Text table: test loss, updates to the target, Spearman and pool-size stability per sampler; the claims."""
  header = (
      f"{'sampler':<18}{'final test loss':>20}{'best test loss':>20}{'updates to target':>22}{'reached':>9}"
      f"{'Spearman':>17}{'first 10%':>17}{'last 10%':>17}{'CV of pool ESS':>17}"
  )
  lines = [header, "-" * len(header)]
  for name, m in summary["samplers"].items():
    lines.append(
        f"{name:<18}{ci_text(m['final_test_loss'], digits=4):>20}{ci_text(m['best_test_loss'], digits=4):>20}"
        f"{ci_text(m['updates_to_target'], digits=0):>22}{m['reached_target']:>5}/{len(summary['seeds'])}"
        f"{ci_text(m.get('spearman'), digits=3):>18}{ci_text(m.get('spearman_first'), digits=3):>17}"
        f"{ci_text(m.get('spearman_last'), digits=3):>17}{ci_text(m['pool_ess_cv'], digits=3):>17}"
    )
  lines += ["", "claims (paired per seed, mean +- 95% CI)"] + dvn_common.claim_lines(summary["claims"])
  lines.append(
      f"\nmean +- 95% CI over {len(summary['seeds'])} seeds; losses on the held-out test split; target test loss"
      f" {summary['target_loss']}; updates to target over the seeds that reached it."
  )
  return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
  """Test loss per epoch for every sampler (left); the DVNs' Spearman per epoch (right)."""
  plt = runs.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for name, m in summary["samplers"].items():
    curve = m["test_loss_curve"]
    left.plot(np.arange(1, len(curve) + 1), curve, label=name)
    if "spearman_curve" in m:
      right.plot(np.arange(1, len(curve) + 1), m["spearman_curve"], label=name)
  left.axhline(summary["target_loss"], color="k", ls="--", lw=0.8, label="target")
  left.set(xlabel="epoch", ylabel="test loss (mean over seeds)", yscale="log")
  right.axhline(0.0, color="k", lw=0.8)
  right.set(xlabel="epoch", ylabel="Spearman, predicted vs true contribution")
  left.legend(fontsize=8)
  right.legend(fontsize=8)
  fig.suptitle(f"{NAME}, {len(summary['seeds'])} seeds")
  runs.save_figure(fig, path)


def run_seed(
    config: Config, name: str, method, model, dataset: data.Dataset, steps_per_epoch: int, seed: int, log
) -> dict[str, Any]:
  """One sampler on one seed: its test-loss curve, updates to the target, Spearman per epoch and pool stability."""
  tagged = lambda record: log({"sampler": name, "seed": seed, **record})
  result = dvn_common.train_run(model, dataset, dvn_common.train_config(config, seed), method, tagged)
  ess = result.pool_ess
  return {
      "seed": seed,
      "test_loss": [r["test/loss"] for r in result.history],
      "updates_to_target": updates_to_target(result.history, config.target_loss),
      "spearman_by_epoch": dvn_common.by_epoch(result.probes, steps_per_epoch, config.epochs).tolist(),
      "first_order_spearman": nanmean(result.probes[:, 2]),
      "pool_ess_cv": float(ess.std() / ess.mean()) if ess.size else float("nan"),
  }


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Train every sampler on every seed (one unit each, skipped when the folder has it finished), write the run
  folder and return the summary."""
  _, units = runs.open_run(out_dir, config)
  arms = {name: (name, config.sampler) for name in config.samplers}
  for t in config.temperatures:
    arms[f"dvn, T={t:g}"] = ("dvn", dataclasses.replace(config.sampler, temperature=t))
  results: dict[str, list[dict]] = {}
  datasets = {seed: data.load(config.dataset, seed=seed, **config.dataset_options) for seed in config.seeds}
  steps_per_epoch = len(datasets[config.seeds[0]].train) // config.batch_size
  model = models.MLP(config.hidden, num_outputs=1)
  loss_fn = train.loss_fn_for(datasets[config.seeds[0]])
  for name, (kind, settings) in arms.items():
    method = dvn_common.make_sampler(kind, model, loss_fn, settings)  # one per sampler, so its epoch compiles once
    results[name] = [
        units.run(
            f"{name}/seed={seed}",
            lambda log, name=name, method=method, seed=seed: run_seed(
                config, name, method, model, datasets[seed], steps_per_epoch, seed, log
            ),
        )
        for seed in config.seeds
    ]
  summary = {
      "seeds": list(config.seeds), "target_loss": config.target_loss, "steps_per_epoch": steps_per_epoch,
      **summarise(config, results),
  }
  summary["per_seed"] = results
  summary["table"] = format_table(summary)
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, out_dir / "dvn_sine.png")
  return summary
