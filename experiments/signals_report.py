"""Per-sample signal report: how well does each signal tell corrupted training samples from clean ones?

Command:   metasel run signals-report             (about 20 seconds on a 2-core CPU)
Quick:     metasel run signals-report --quick     (seconds; used by the tests)

An MLP (or a CNN, for images) is trained with plain uniform batches on a generated mixture (clean real
data plus synthetic data of known quality tiers) while a tracker records each sample's training dynamics. At the end every signal
of `metasel.signals` and `metasel.persample` is computed for the whole training pool, and each is scored by
its AUC against the true clean/corrupt tier (0.5: no information; above 0.5: high values mark corrupt
samples; below: low values do). Several seeds give a mean and a 95% interval per signal.

Writes config.json, metrics.jsonl, summary.json, signals_seed<S>.npz and signals.png to the run folder.
Expected result: training-dynamics and position signals (loss mean, confidence, kNN agreement, cosine
to the clean class centre) separate label noise and pure noise far from 0.5; which signals work is read
from the table, not assumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metasel import data, persample, runs, signals, stats, train
from metasel_experiments import check_model, load_checked, make_model, with_representation

NAME = "signals-report"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the signal report; `get_config(quick=True)` shrinks everything for tests."""

  dataset: str = "mixture"
  dataset_options: dict = dataclasses.field(default_factory=dict)
  model: str = "mlp"  # "mlp", "cnn" for image datasets such as digits-synthetic, "transformer" for text
  hidden: tuple[int, ...] = (128, 128)
  train: train.TrainConfig = train.TrainConfig(epochs=15, batch_size=64, learning_rate=1e-3)
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  redundancy_k: int = 5
  reference_k: int = 3
  knn_k: int = 5


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      dataset_options={"n_real": 200, "n_synthetic": 400, "n_val": 100, "n_test": 200},
      hidden=(32,),
      train=train.TrainConfig(epochs=3, batch_size=32, val_batch_size=32, learning_rate=3e-3),
      seeds=(0, 1),
  )


def dataset_options(config: Config) -> dict:
  """The loader options of the configured dataset (text as token ids for the transformer)."""
  return with_representation(config.dataset, config.dataset_options, config.model)


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  dataset = load_checked(NAME, config.dataset, dataset_options(config), config.seeds[0], needs_tiers=True)
  check_model(config.model, dataset)
  config.train.check(dataset)


def pool_signals(
    model, params, tracker: signals.TrackerState, dataset: data.Dataset, config: Config
) -> dict[str, np.ndarray]:
  """Every per-sample signal (N,) of the training pool at the end of training, computed on device."""
  loss_fn = train.loss_fn_for(dataset)
  classification = dataset.task == "classification"

  @jax.jit
  def compute(params, tracker, x, y, val_x, val_y):
    tape = persample.record(model, params, x, y, loss_fn)
    out = {
        "loss": tape.losses,
        "grad_norm": persample.grad_norms(model, params, x, y, loss_fn, tape=tape),
        "embedding_norm": signals.embedding_norm(tape.embeddings),
    }
    max_cos, mean_topk_cos = signals.redundancy(tape.embeddings, k=config.redundancy_k)
    out.update(redundancy_max_cosine=max_cos, redundancy_mean_topk_cosine=mean_topk_cos)
    if classification:
      out.update(
          entropy=signals.predictive_entropy(tape.outputs),
          margin=signals.margin(tape.outputs, y),
          el2n=signals.el2n(tape.outputs, y),
      )
      val_emb = persample.embeddings(model, params, val_x)
      out.update(
          signals.position_features(
              tape.embeddings,
              y,
              val_emb,
              val_y,
              dataset.num_classes,
              losses=tape.losses,
              topk=config.reference_k,
              knn=config.knn_k,
          )
      )
    dynamics = signals.training_dynamics_features(signals.tracker_summary(tracker))
    out.update({f"dyn/{k}": v for k, v in dynamics.items()})
    return out

  split = dataset.train
  result = compute(params, tracker, split.x, split.y, dataset.val.x, dataset.val.y)
  return {k: np.asarray(v) for k, v in jax.device_get(result).items()}


def run_seed(config: Config, seed: int, log) -> dict[str, Any]:
  """Train one seed and score every signal against the true tiers."""
  options = dataset_options(config)
  dataset = data.load(config.dataset, seed=seed, **options)
  model = make_model(config.model, dataset, config.hidden, options)
  train_config = dataclasses.replace(config.train, seed=seed)
  fit = train.fit(model, dataset, train_config, log=lambda r: log({"seed": seed, **r}))
  values = pool_signals(model, fit.state.params, fit.state.tracker, dataset, config)
  tier = dataset.train.tier
  corrupt = tier != data.CLEAN_TIER
  per_tier = {
      name: {k: float(np.nanmean(v[tier == t])) for k, v in values.items()}
      for t, name in enumerate(dataset.tier_names)
      if np.any(tier == t)
  }
  tier_auc = {
      name: {k: stats.auc(v[(tier == t) | ~corrupt], tier[(tier == t) | ~corrupt] == t) for k, v in values.items()}
      for t, name in enumerate(dataset.tier_names)
      if t != data.CLEAN_TIER and np.any(tier == t)
  }
  return {
      "seed": seed,
      "final": fit.history[-1],
      "auc": {k: stats.auc(v, corrupt) for k, v in values.items()},
      "tier_auc": tier_auc,
      "per_tier_mean": per_tier,
      "values": values,
      "tier": tier,
      "tier_names": dataset.tier_names,
  }


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean and 95% interval over seeds of every signal's AUC and of the final test metrics."""
  names = list(per_seed[0]["auc"])
  auc = {k: stats.mean_ci([r["auc"][k] for r in per_seed])._asdict() for k in names}
  tier_auc = {
      tier: {k: stats.mean_ci([r["tier_auc"][tier][k] for r in per_seed])._asdict() for k in names}
      for tier in per_seed[0]["tier_auc"]
  }
  final_keys = [k for k in per_seed[0]["final"] if k.startswith("test/") or k.startswith("val/")]
  final = {k: stats.mean_ci([r["final"][k] for r in per_seed])._asdict() for k in final_keys}
  return {"auc": auc, "tier_auc": tier_auc, "final": final, "seeds": [r["seed"] for r in per_seed]}


def format_table(summary: dict[str, Any], per_seed: list[dict[str, Any]]) -> str:
  """A text table: per-tier means (averaged over seeds) and AUC mean +- 95% half-width per signal."""
  tiers = list(per_seed[0]["per_tier_mean"])
  names = sorted(summary["auc"], key=lambda k: -abs(summary["auc"][k]["mean"] - 0.5))
  header = f"{'signal':<30}" + "".join(f"{t[:14]:>15}" for t in tiers) + f"{'AUC corrupt':>20}"
  lines = [header, "-" * len(header)]
  for name in names:
    cells = "".join(
        f"{np.mean([r['per_tier_mean'][t][name] for r in per_seed]):>15.4f}" for t in tiers
    )
    a = summary["auc"][name]
    lines.append(f"{name:<30}{cells}{a['mean']:>11.3f} +- {a['half_width']:.3f}")
  lines.append("")
  for tier, aucs in summary["tier_auc"].items():
    best = max(aucs, key=lambda k: abs(aucs[k]["mean"] - 0.5))
    lines.append(
        f"best signal for {tier} vs clean: {best} (AUC {aucs[best]['mean']:.3f} +- {aucs[best]['half_width']:.3f})"
    )
  for key, value in summary["final"].items():
    lines.append(f"{key}: {value['mean']:.4f} +- {value['half_width']:.4f} over {value['n']} seeds")
  return "\n".join(lines)


def plot(summary: dict[str, Any], first: dict[str, Any], path: Path) -> None:
  """Left: AUC of every signal with 95% intervals. Right: per-tier distributions of the best six."""
  plt = runs.pyplot()

  names = sorted(summary["auc"], key=lambda k: summary["auc"][k]["mean"])
  best = sorted(names, key=lambda k: -abs(summary["auc"][k]["mean"] - 0.5))[:6]
  fig = plt.figure(figsize=(15, 7))
  ax = fig.add_subplot(1, 3, 1)
  means = [summary["auc"][k]["mean"] for k in names]
  errs = [summary["auc"][k]["half_width"] for k in names]
  ax.barh(names, means, xerr=np.nan_to_num(errs), color="tab:blue")
  ax.axvline(0.5, color="k", lw=0.8, ls="--")
  ax.set_xlim(0, 1)
  ax.set_xlabel(f"AUC vs corrupt (mean, 95% CI, {len(summary['seeds'])} seeds)")
  ax.tick_params(axis="y", labelsize=7)
  tier, tier_names = first["tier"], first["tier_names"]
  present = [t for t in range(len(tier_names)) if np.any(tier == t)]
  for i, name in enumerate(best):
    sub = fig.add_subplot(3, 3, 3 * (i // 2) + 2 + i % 2)
    sub.boxplot([first["values"][name][tier == t] for t in present], showfliers=False)
    sub.set_xticks(range(1, len(present) + 1), [tier_names[t][:10] for t in present], fontsize=6)
    sub.set_title(f"{name} (seed {first['seed']})", fontsize=8)
  runs.save_figure(fig, path)


def write_signals(path: Path, result: dict[str, Any]) -> None:
  """A seed's signals and tiers as .npz, written once and atomically (a resumed run keeps a finished seed's file)."""
  if not path.exists():
    runs.save_npz(path, tier=result["tier"], **result["values"])


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every seed (one unit each, skipped when the folder has it finished), write the run folder and return the
  summary."""
  _, units = runs.open_run(out_dir, config)
  per_seed = []
  for seed in config.seeds:
    result = units.run(f"seed={seed}", lambda log, seed=seed: run_seed(config, seed, log))
    write_signals(out_dir / f"signals_seed{seed}.npz", result)
    per_seed.append(result)
  summary = summarise(per_seed)
  summary["table"] = format_table(summary, per_seed)
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, per_seed[0], out_dir / "signals.png")
  return summary
