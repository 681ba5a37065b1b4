"""MTS benchmark: meta-learned data weights against no selection, L2RW and Meta-Weight-Net.

Command:   metasel run mts-benchmark              (about 4 minutes on a 2-core CPU)
Quick:     metasel run mts-benchmark --quick      (about 30 seconds, mostly compilation; used by the tests)

Tests the claims of the MTS paper (arXiv 2606.00571): meta-learned data weights suffer from a poor
meta-gradient signal-to-noise ratio that a larger batch fixes; features that locate each sample in its
distribution (position) and in its training dynamics help; and MTS beats no selection (+5.49% in the
paper) and the strongest baseline (+2.89%).

Every method trains the same MLP with Adam at the same learning rate for the same number of epochs over
the same real+synthetic training pool, with the same clean validation batch size:
  uniform        no selection, small batch          uniform-large  no selection, large batch
  l2rw           Learning to Reweight, small batch  mwn            Meta-Weight-Net, small batch
  mts-small      MetaNet on the loss with class and real/synthetic group embeddings, small batch
  mts-large      the same at the large batch
  mts-features   the large batch with loss, position and training-dynamics features; the dynamics
                 are a per-sample table from the same seed's uniform run.
The datasets are a Gaussian mixture, synthetic digits (flattened for the MLP) and a real-text mixture
made from the AG News test split (TF-IDF) with a corrupted synthetic part.

For every dataset, method and seed: the final test accuracy (and, for reference, the test accuracy at
the epoch of best validation accuracy) and, for the learned weightings, the AUC
of the weights against the true corrupt tier over the whole training pool at the end of training,
oriented so that AUC > 0.5 means corrupt samples get lower weight. MetaNet methods score each sample
by the meta-network's raw weight, with the features z-scored (and the loss percentile taken) over the
pool rather than per batch;
L2RW scores each sample by its raw weight -d L_val / d eps_i at the final parameters against one
validation batch. Gains are paired per-seed differences, and each claim's verdict says "holds",
"does not hold" or "no significant difference" from whether their 95% interval excludes 0. The claims:
a larger batch improves MTS (mts-large - mts-small), the new features improve it (mts-features -
mts-large), MTS beats no selection (mts-features - uniform) and the strongest baseline (the best of
uniform, uniform-large, l2rw and mwn by mean accuracy); a fifth row checks whether the larger batch helps
MTS more than it helps the model alone ((mts-large - mts-small) - (uniform-large - uniform)), since at a
fixed number of epochs the larger batch also takes fewer steps. Every claim is judged per dataset and on
the per-seed differences averaged over the datasets.

Writes config.json, metrics.jsonl (per-epoch history), summary.json and mts_benchmark.png.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasel import core, data, mts, runs, signals, stats, train
from metasel_experiments import (
    check_model, check_plan, ci_text, data_file, dataset_plan, interval, load_checked, make_model, shared_data,
)

NAME = "mts-benchmark"
AG_NEWS = str(shared_data("ag_news/test.csv"))
AG_NEWS_SPEC = f"corrupted:csv:{AG_NEWS}"

METHODS = ("uniform", "uniform-large", "l2rw", "mwn", "mts-small", "mts-large", "mts-features")
BASELINES = ("uniform", "uniform-large", "l2rw", "mwn")
LEARNED = ("l2rw", "mwn", "mts-small", "mts-large", "mts-features")
LARGE = ("uniform-large", "mts-large", "mts-features")
VERDICTS = ("holds", "does not hold", "no significant difference")
BEST_BASELINE = "strongest baseline"
# Each claim: the sum of the accuracies of the first methods minus that of the second, paired per seed.
CLAIMS = (
    ("larger batch improves MTS", ("mts-large",), ("mts-small",)),
    ("new features improve MTS", ("mts-features",), ("mts-large",)),
    ("MTS beats no selection", ("mts-features",), ("uniform",)),
    ("MTS beats the strongest baseline", ("mts-features",), (BEST_BASELINE,)),
    # The batch's effect on MTS beyond its effect on the model alone (a difference in differences).
    ("larger batch helps MTS beyond the model", ("mts-large", "uniform"), ("mts-small", "uniform-large")),
)
POSITION_NEIGHBOURS = 5  # kNN of mts.position_features' default
PAPER_GAINS = {"MTS beats no selection": 0.0549, "MTS beats the strongest baseline": 0.0289}

DATASET_OPTIONS = {
    "mixture": {"n_real": 400, "n_synthetic": 1600, "n_val": 300, "n_test": 1000},
    "digits-synthetic": {"n_real": 300, "n_synthetic": 1200, "n_val": 300, "n_test": 500, "flatten": True},
    AG_NEWS_SPEC: {
        "n_train": 2000, "n_real": 400, "n_synthetic": 1600, "n_val": 300, "n_test": 1000, "max_features": 2000,
    },
}
QUICK_OPTIONS = {
    "mixture": {"n_real": 80, "n_synthetic": 240, "n_val": 64, "n_test": 200, "dim": 16},
    "digits-synthetic": {"n_real": 100, "n_synthetic": 200, "n_val": 100, "n_test": 200, "flatten": True},
    AG_NEWS_SPEC: {
        "n_train": 300, "n_real": 80, "n_synthetic": 240, "n_val": 64, "n_test": 200, "max_features": 300,
        "max_length": 32, "vocab_size": 2000,
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the benchmark; `get_config(quick=True)` shrinks everything for tests.

  `options` maps each dataset spec to its loader options. `dataset` (set by the CLI's --dataset)
  replaces `datasets` with that one, its options being `options[dataset]` updated by `dataset_options`.
  """

  datasets: tuple[str, ...] = ("mixture", "digits-synthetic", AG_NEWS_SPEC)
  options: dict = dataclasses.field(default_factory=lambda: dict(DATASET_OPTIONS))
  dataset: str | None = None
  dataset_options: dict = dataclasses.field(default_factory=dict)
  model: str = "mlp"  # "mlp", or "transformer" on text read as token ids
  hidden: tuple[int, ...] = (128, 128)
  epochs: int = 40
  small_batch: int = 64
  large_batch: int = 512
  val_batch_size: int = 128
  learning_rate: float = 1e-3
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      datasets=("mixture",),
      options=dict(QUICK_OPTIONS),
      hidden=(32,),
      epochs=2,
      small_batch=32,
      large_batch=128,
      val_batch_size=32,
      learning_rate=3e-3,
      seeds=(0, 1),
  )


def train_config(config: Config, batch_size: int, seed: int) -> train.TrainConfig:
  """The shared training settings at one batch size."""
  return train.TrainConfig(
      epochs=config.epochs, batch_size=batch_size, val_batch_size=config.val_batch_size,
      optimizer="adam", learning_rate=config.learning_rate, seed=seed,
  )


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  plan = check_plan(config)
  if config.val_batch_size < POSITION_NEIGHBOURS:
    raise ValueError(
        f"val_batch_size={config.val_batch_size} is too small for the position features, which compare each"
        f" sample with its {POSITION_NEIGHBOURS} nearest validation samples; expected at least {POSITION_NEIGHBOURS}"
    )
  if not config.large_batch > config.small_batch:
    raise ValueError(
        f"large_batch={config.large_batch} must exceed small_batch={config.small_batch}; the benchmark"
        " compares the two"
    )
  for spec, options in plan.items():
    dataset = load_checked(NAME, spec, options, config.seeds[0], needs_tiers=True)
    check_model(config.model, dataset)
    for batch_size in (config.small_batch, config.large_batch):
      try:
        train_config(config, batch_size, config.seeds[0]).check(dataset)
      except ValueError as err:
        raise ValueError(f"dataset {spec!r}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# Methods and the scores of their weights over the training pool


class Arm(NamedTuple):
  """One method as trained: the `core.Method`, its batch size, and how to score its weights."""

  method: core.Method
  batch_size: int
  features: mts.Features | None = None
  meta_net: mts.MetaNet | None = None
  standardize: bool = True


def dynamics_table(fit: train.FitResult) -> np.ndarray:
  """Training-dynamics features (N, 8) of every training sample from a finished run, NaN-free."""
  dynamics = signals.training_dynamics_features(signals.tracker_summary(fit.state.tracker))
  table = np.stack([np.asarray(v, np.float32) for v in dynamics.values()], axis=-1)
  return np.nan_to_num(table, nan=0.0, posinf=0.0, neginf=0.0)


def make_arm(name: str, config: Config, model, dataset: data.Dataset, table: np.ndarray | None) -> Arm:
  """The method `name` of `METHODS` for this dataset (mts-features needs the uniform run's `table`)."""
  loss_fn = train.loss_fn_for(dataset)
  batch_size = config.large_batch if name in LARGE else config.small_batch
  if name in ("uniform", "uniform-large"):
    return Arm(mts.uniform(), batch_size)
  if name == "l2rw":
    return Arm(mts.l2rw(model, loss_fn), batch_size)
  if name == "mwn":
    net = mts.MetaNet(hidden=(100,))
    return Arm(mts.mwn(model, loss_fn, meta_net=net), batch_size, mts.loss_features(model, loss_fn), net, False)
  net = mts.MetaNet(num_classes=dataset.num_classes, num_groups=2)
  features = mts.loss_features(model, loss_fn)
  if name == "mts-features":
    features = mts.concat_features(
        features, mts.position_features(model, loss_fn, dataset.num_classes), mts.table_features(table)
    )
  return Arm(mts.mts(model, loss_fn, features, meta_net=net, name=name), batch_size, features, net)


def reference_batch(dataset: data.Dataset, size: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """`size` random clean validation rows: the reference a method sees in one step."""
  rows = np.random.default_rng(seed).permutation(len(dataset.val))[:size]
  return jnp.asarray(dataset.val.x[rows]), jnp.asarray(dataset.val.y[rows])


def pool_scores(arm: Arm, model, dataset: data.Dataset, fit: train.FitResult, val: tuple, seed: int) -> np.ndarray:
  """Each training sample's weight score (N,) at the end of training: high means up-weighted."""
  loss_fn = train.loss_fn_for(dataset)
  split = dataset.train
  batch = core.Batch(jnp.arange(len(split)), jnp.asarray(split.x), jnp.asarray(split.y), jnp.asarray(split.groups))
  ctx = core.StepContext(fit.state.params, batch, *val, jax.random.key(seed))
  if arm.meta_net is None:  # L2RW: the raw weight -d L_val / d eps_i of one virtual step at eps = 0

    @jax.jit
    def scores(ctx):
      zero = jnp.zeros((len(split),), jnp.float32)
      return -mts.batch_hypergrad(model, loss_fn, lambda eps: eps, zero, ctx, inner_learning_rate=1.0).grads

    return np.asarray(scores(ctx))

  @jax.jit
  def scores(meta_params, ctx):
    inputs = mts.meta_inputs(arm.features, arm.meta_net, ctx, standardize=arm.standardize)
    return arm.meta_net.apply({"params": meta_params}, *inputs)

  return np.asarray(scores(fit.state.method_state.params, ctx))


def weight_aucs(scores: np.ndarray, dataset: data.Dataset) -> tuple[float, dict[str, float]]:
  """AUC of low weight for corrupt samples, overall and per corruption tier against the clean ones."""
  tier = dataset.train.tier
  clean = tier == data.CLEAN_TIER
  per_tier = {
      name: stats.auc(-scores[clean | (tier == t)], tier[clean | (tier == t)] == t)
      for t, name in enumerate(dataset.tier_names)
      if t != data.CLEAN_TIER and np.any(tier == t)
  }
  return stats.auc(-scores, ~clean), per_tier


# ----------------------------------------------------------------------------------------------------
# Runs


def run_method(
    config: Config, spec: str, name: str, arm: Arm, model, dataset: data.Dataset, seed: int, log
) -> dict[str, Any]:
  """Train one method on one dataset and seed; its test accuracy, its weight AUCs (learned weightings) and, for
  uniform, the training-dynamics `table` that mts-features reads."""

  def write(record):
    if "epoch" in record:
      log({"dataset": spec, "method": name, "seed": seed, **record})

  fit = train.fit(model, dataset, train_config(config, arm.batch_size, seed), arm.method, log=write)
  final = fit.history[-1]
  best = max(fit.history, key=lambda record: record["val/accuracy"])
  result = {
      "seed": seed, "accuracy": final["test/accuracy"], "val_accuracy": final["val/accuracy"],
      "accuracy_at_best_val": best["test/accuracy"], "best_val_epoch": best["epoch"],
  }
  if name in LEARNED:
    val = reference_batch(dataset, config.val_batch_size, seed)
    result["auc"], result["tier_auc"] = weight_aucs(pool_scores(arm, model, dataset, fit, val, seed), dataset)
  return {"result": result, "table": dynamics_table(fit) if name == "uniform" else None}


def run_seed(config: Config, spec: str, model, load_dataset, seed: int, units, arms: dict[str, Arm]) -> dict[str, dict]:
  """Every method on one dataset and seed, one unit each (keyed `spec/method/seed=S`); per-method results.

  `arms` holds the methods of this dataset, shared by every seed so that their compiled epochs are reused; the
  one that depends on the seed's training dynamics (mts-features) is made from the uniform unit's table.
  `load_dataset()` gives the seed's dataset, loaded only when a unit is computed.
  """
  results, table = {}, None
  for name in METHODS:

    def compute(log, name=name, table=table):
      dataset = load_dataset()
      arm = make_arm(name, config, model, dataset, table) if name == "mts-features" else arms[name]
      return run_method(config, spec, name, arm, model, dataset, seed, log)

    out = units.run(f"{spec}/{name}/seed={seed}", compute)
    table = out["table"] if name == "uniform" else table
    results[name] = out["result"]
  return results


def _accuracies(per_seed: dict[str, list[dict]], name: str) -> np.ndarray:
  return np.array([r["accuracy"] for r in per_seed[name]])


def summarise_dataset(per_seed: dict[str, list[dict]]) -> dict[str, Any]:
  """Accuracy and weight AUC intervals, paired gains and claim verdicts for one dataset."""
  methods = {}
  for name, rows in per_seed.items():
    entry = {key: interval([r[key] for r in rows]) for key in ("accuracy", "accuracy_at_best_val")}
    if "auc" in rows[0]:
      entry["auc"] = interval([r["auc"] for r in rows])
      entry["tier_auc"] = {t: interval([r["tier_auc"][t] for r in rows]) for t in rows[0]["tier_auc"]}
    methods[name] = entry
  best = max(BASELINES, key=lambda name: methods[name]["accuracy"]["mean"])
  acc = {name: _accuracies(per_seed, name) for name in per_seed}
  acc[BEST_BASELINE] = acc[best]
  gains = {
      name: {
          "vs_uniform": interval(acc[name] - acc["uniform"]),
          "vs_strongest_baseline": interval(acc[name] - acc[best]),
      }
      for name in METHODS
  }
  claims = {}
  for claim, plus, minus in CLAIMS:
    diff = interval(_difference(acc, plus, minus))
    names = [best if name == BEST_BASELINE else name for name in (*plus, *minus)]
    claims[claim] = {"comparison": _comparison(names, len(plus)), "difference": diff, "verdict": stats.verdict(diff)}
  return {"methods": methods, "strongest_baseline": best, "gains": gains, "claims": claims, "accuracies": acc}


def overall_claims(per_dataset: dict[str, dict]) -> dict[str, Any]:
  """The claims on the mean over datasets of each seed's paired difference."""
  out = {}
  for claim, plus, minus in CLAIMS:
    diff = interval(np.mean([_difference(d["accuracies"], plus, minus) for d in per_dataset.values()], axis=0))
    comparison = _comparison([*plus, *minus], len(plus)) + ", averaged"
    out[claim] = {"comparison": comparison, "difference": diff, "verdict": stats.verdict(diff)}
  return out


def _difference(acc: dict[str, np.ndarray], plus: tuple[str, ...], minus: tuple[str, ...]) -> np.ndarray:
  """Per-seed sum of the `plus` methods' accuracies minus the `minus` methods'."""
  return sum(acc[name] for name in plus) - sum(acc[name] for name in minus)


def _comparison(names: list[str], num_plus: int) -> str:
  """"a - b", or "(a - c) - (d - b)" for the difference in differences a + b - c - d."""
  if num_plus == 1:
    return f"{names[0]} - {names[1]}"
  a, b, c, d = names
  return f"({a} - {c}) - ({d} - {b})"


def format_table(summary: dict[str, Any]) -> str:
  """A text table per dataset: accuracy (%), weight AUC, gains (points) and the claims' verdicts."""
  lines = []
  for spec, result in summary["datasets"].items():
    header = (
        f"{'method':<15}{'test acc %':>17}{'weight AUC':>17}{'vs uniform':>17}{'vs strongest':>17}"
        f"{'acc @ best val':>17}"
    )
    lines += [f"{spec}  (strongest baseline: {result['strongest_baseline']})", header, "-" * len(header)]
    for name in METHODS:
      m, g = result["methods"][name], result["gains"][name]
      lines.append(
          f"{name:<15}{ci_text(m['accuracy'], 100):>17}{ci_text(m.get('auc'), digits=3):>17}"
          f"{ci_text(g['vs_uniform'], 100, True):>17}{ci_text(g['vs_strongest_baseline'], 100, True):>17}"
          f"{ci_text(m['accuracy_at_best_val'], 100):>17}"
      )
    tiers = list(result["methods"]["mts-features"]["tier_auc"])
    lines.append(f"{'tier AUC':<15}" + "".join(f"{t[:14]:>15}" for t in tiers))
    for name in LEARNED:
      cells = "".join(f"{result['methods'][name]['tier_auc'][t]['mean']:>15.3f}" for t in tiers)
      lines.append(f"{name:<15}{cells}")
    lines += _claim_lines(result["claims"]) + [""]
  if "overall" in summary:
    lines += ["all datasets (mean of per-seed differences)"] + _claim_lines(summary["overall"]) + [""]
  lines.append(
      f"test accuracy at the last epoch and gains (paired, per seed) in %, mean +- 95% CI over"
      f" {len(summary['seeds'])} seeds; acc @ best val: test accuracy at the epoch of best validation accuracy."
      "\nweight AUC > 0.5: corrupt samples get lower weight. Paper: +5.49 vs no selection, +2.89 vs the"
      " strongest baseline."
  )
  return "\n".join(lines)


def _claim_lines(claims: dict[str, dict]) -> list[str]:
  width = max(len(c["comparison"]) for c in claims.values()) + 2
  return [
      f"  {claim:<42}{c['comparison']:<{width}}{ci_text(c['difference'], 100, True):>16}  {c['verdict']}"
      for claim, c in claims.items()
  ]


def _short(spec: str) -> str:
  """A dataset spec with its file path cut to the last folder and file name, for plot titles."""
  path = data_file(spec)
  if path is None:
    return spec
  return spec.removesuffix(path) + "/".join(Path(path).parts[-2:])


def plot(summary: dict[str, Any], path: Path) -> None:
  """Per dataset: test accuracy (top) and weight AUC (bottom) of every method, with 95% intervals."""
  plt = runs.pyplot()

  specs = list(summary["datasets"])
  fig, axes = plt.subplots(2, len(specs), figsize=(5 * len(specs), 7), squeeze=False)
  colours = [f"C{i}" for i in range(len(METHODS))]
  for col, spec in enumerate(specs):
    methods = summary["datasets"][spec]["methods"]
    acc = [methods[m]["accuracy"] for m in METHODS]
    ax = axes[0, col]
    means = np.array([a["mean"] for a in acc])
    ax.bar(METHODS, means, yerr=np.nan_to_num([a["half_width"] for a in acc]), color=colours, capsize=3)
    ax.set_ylim(max(0.0, means.min() - 0.1), min(1.0, means.max() + 0.05))
    ax.set_title(_short(spec), fontsize=9)
    ax.set_ylabel("test accuracy (95% CI)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    auc = [methods[m]["auc"] for m in LEARNED]
    ax = axes[1, col]
    ax.bar(LEARNED, [a["mean"] for a in auc], yerr=np.nan_to_num([a["half_width"] for a in auc]),
           color=colours[2:], capsize=3)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("weight AUC, corrupt low (95% CI)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
  fig.suptitle(f"mts-benchmark, {len(summary['seeds'])} seeds")
  runs.save_figure(fig, path)


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every dataset, seed and method (one unit each, skipped when the folder has it finished), write the run
  folder and return the summary."""
  _, units = runs.open_run(out_dir, config)
  per_seed: dict[str, dict[str, list[dict]]] = {}
  for spec, options in dataset_plan(config).items():
    per_seed[spec] = {name: [] for name in METHODS}
    first = data.load(spec, seed=config.seeds[0], **options)
    model = make_model(config.model, first, config.hidden, options)  # equal for every seed
    arms = {name: make_arm(name, config, model, first, None) for name in METHODS if name != "mts-features"}
    for seed in config.seeds:
      load_dataset = functools.cache(lambda seed=seed: data.load(spec, seed=seed, **options))
      for name, result in run_seed(config, spec, model, load_dataset, seed, units, arms).items():
        per_seed[spec][name].append(result)
  datasets = {spec: summarise_dataset(rows) for spec, rows in per_seed.items()}
  summary = {"seeds": list(config.seeds), "datasets": datasets, "per_seed": per_seed, "paper_gains": PAPER_GAINS}
  if len(datasets) > 1:
    summary["overall"] = overall_claims(datasets)
  summary["table"] = format_table(summary)
  for result in datasets.values():
    result.pop("accuracies")
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, out_dir / "mts_benchmark.png")
  return summary
