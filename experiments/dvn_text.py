"""DVN on real text classification: AG News, Yelp (binary) and DBpedia, with its ablations.

Command:   metasel run dvn-text            (about 2 minutes on a 2-core CPU)
Quick:     metasel run dvn-text --quick    (seconds; used by the tests)

The text setting of "Learning to Value Data: A Meta-Learned Sampler": per dataset 1,000 training and 200
test samples, TF-IDF inputs (2,000 terms fitted on the training part), an MLP 2 x 128, Adam 1e-3,
3 epochs of batch 32, meta-updates every T = 10 steps with K = 20 probes. A further 200 samples form the
validation split whose batches the DVN's contributions are measured on; train, validation and test are
disjoint class-stratified draws for each seed, and every reported number is on the test part, which
nothing is tuned on. The files are read from the shared data folder:
  AG News   ag_news/test.csv, the official test split (7,600 rows, 4 classes)
  Yelp      yelp_review_full_subset/test_yelp.csv, a third-party 5-star set (13,895 rows) mapped to
            polarity by Zhang's rule (1-2 stars negative, 4-5 positive, 3 dropped), used because the
            Yelp Polarity file holds only 1,000 rows; it is a Yelp-derived binary task, not Yelp Polarity
  DBpedia   dbpedia_14/validation.csv, a 30,000-row subset (14 classes)

Samplers: uniform epochs, gradient-norm sampling, the DVN, and two ablations: the DVN without the
softmax over its scores (`dvn.sampling_probs(..., "none")`) and without the embedding-norm feature.
Label-noise ablation on the first dataset: 0/10/20/50% of the training labels flipped to another class
(`data.synthetic.label_noise`), for uniform, gradient-norm and the DVN; besides accuracy and Spearman it
reports the share of the DVN's final sampling probability on flipped samples (the noise rate if it
ignored them).

Claims tested, per dataset and on the per-seed differences averaged over the datasets: the DVN's test
accuracy beats uniform and gradient-norm sampling (paper: +1-3 points); the softmax matters (DVN minus
its un-normalised variant); the embedding norm matters (paper: removing it costs 2-4 points); label
noise degrades the DVN (accuracy and Spearman at each noise level minus at 0%).

Writes config.json, metrics.jsonl (per-epoch records), summary.json and dvn_text.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from metasel import data, runs, train
from metasel_experiments import (
    check_model, check_plan, ci_text, dataset_plan, dvn_common, interval, load_checked, make_model, shared_data,
)
from metasel_experiments.dvn_common import SamplerSettings, claim, nanmean

NAME = "dvn-text"
SIZES = {"n_train": 1000, "n_val": 200, "n_test": 200, "max_features": 2000}
AG_NEWS = f"csv:{shared_data('ag_news/test.csv')}"
YELP = f"csv:{shared_data('yelp_review_full_subset/test_yelp.csv')}"
DBPEDIA = f"csv:{shared_data('dbpedia_14/validation.csv')}"
YELP_POLARITY = {0: 0, 1: 0, 2: None, 3: 1, 4: 1}
DATASET_OPTIONS = {AG_NEWS: dict(SIZES), YELP: {**SIZES, "label_map": YELP_POLARITY}, DBPEDIA: dict(SIZES)}
SHORT_NAMES = {AG_NEWS: "AG News", YELP: "Yelp (binary)", DBPEDIA: "DBpedia"}
NOISE_SAMPLERS = ("uniform", "grad-norm", "dvn")
PAPER_GAIN = "+1 to +3 points"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the experiment; `get_config(quick=True)` shrinks everything for tests.

  `options` maps each dataset spec to its loader options. `dataset` (the command line's --dataset)
  replaces `datasets` with that one, its options being `options[dataset]` updated by `dataset_options`.
  The label-noise ablation runs on the first dataset at each of `noise_levels` (0 reuses the main runs).
  """

  datasets: tuple[str, ...] = (AG_NEWS, YELP, DBPEDIA)
  options: dict = dataclasses.field(default_factory=lambda: dict(DATASET_OPTIONS))
  dataset: str | None = None
  dataset_options: dict = dataclasses.field(default_factory=dict)
  samplers: tuple[str, ...] = dvn_common.SAMPLERS
  noise_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5)
  model: str = "mlp"  # "mlp" on TF-IDF, or "transformer" on token ids (text read with representation="tokens")
  hidden: tuple[int, ...] = (128, 128)
  epochs: int = 3
  batch_size: int = 32
  val_batch_size: int = 64
  learning_rate: float = 1e-3
  sampler: SamplerSettings = SamplerSettings()
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  small = {"n_train": 160, "n_val": 48, "n_test": 64, "max_features": 200, "max_length": 32, "vocab_size": 2000}
  return Config(
      datasets=("mixture",),
      options={"mixture": {"n_real": 160, "n_synthetic": 0, "n_val": 48, "n_test": 64, "dim": 16}, AG_NEWS: small},
      noise_levels=(0.0, 0.5),
      hidden=(32,),
      epochs=2,
      batch_size=16,
      val_batch_size=16,
      sampler=SamplerSettings(period=3, num_samples=8),
      seeds=(0, 1),
  )


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  plan = check_plan(config)
  for level in config.noise_levels:
    if not (isinstance(level, (int, float)) and 0 <= level < 1):
      raise ValueError(f"noise_levels must lie in [0, 1), got {config.noise_levels!r}")
  if config.noise_levels and config.noise_levels[0] != 0:
    raise ValueError(f"noise_levels must start with 0, the reference level, got {config.noise_levels!r}")
  for spec, options in plan.items():
    dataset = load_checked(NAME, spec, options, config.seeds[0])
    check_model(config.model, dataset)
    try:
      settings = dvn_common.train_config(config, config.seeds[0])
      dvn_common.check_samplers(config.samplers, config.sampler, dataset, settings)
    except ValueError as err:
      raise ValueError(f"dataset {spec!r}: {err}") from None
  if config.noise_levels and not set(NOISE_SAMPLERS) <= set(config.samplers):
    raise ValueError(f"the label-noise ablation compares {NOISE_SAMPLERS}; expected them among samplers")


def run_seed(name, method, model, dataset: data.Dataset, seed: int, config: Config, log, tags: dict) -> dict:
  """Train `method` on one seed's dataset: test curves, the DVN's Spearman and its probability on flipped samples."""
  result = dvn_common.train_run(
      model, dataset, dvn_common.train_config(config, seed), method,
      lambda record: log({**tags, "sampler": name, "seed": seed, **record}),
  )
  flipped = dataset.train.tier != data.CLEAN_TIER
  return {
      "seed": seed,
      "test_accuracy": [r["test/accuracy"] for r in result.history],
      "test_loss": [r["test/loss"] for r in result.history],
      "spearman": nanmean(result.probes[:, 1]),
      "first_order_spearman": nanmean(result.probes[:, 2]),
      "flipped_probability": (
          float(result.probs[flipped].sum()) if result.probs is not None and flipped.any() else None
      ),
  }


def run_sampler(
    units, key: str, name, method, model, datasets: dict[int, data.Dataset], config: Config, tags: dict
) -> list[dict]:
  """`run_seed` on each seed's dataset, one unit each (keyed `key/name/seed=S`), in seed order."""
  return [
      units.run(
          f"{key}/{name}/seed={seed}",
          lambda log, seed=seed, dataset=dataset: run_seed(name, method, model, dataset, seed, config, log, tags),
      )
      for seed, dataset in datasets.items()
  ]


def _final(rows: list[dict]) -> np.ndarray:
  return np.array([r["test_accuracy"][-1] for r in rows])


def _spearman(rows: list[dict]) -> np.ndarray:
  return np.array([r["spearman"] for r in rows])


def summarise_runs(per_sampler: dict[str, list[dict]]) -> dict[str, Any]:
  """Per sampler: final test accuracy and loss, the curves, and the DVN's Spearman, as 95% intervals."""
  out = {}
  for name, rows in per_sampler.items():
    entry = {
        "accuracy": interval(_final(rows)),
        "loss": interval([r["test_loss"][-1] for r in rows]),
        "accuracy_curve": [interval(c) for c in np.array([r["test_accuracy"] for r in rows]).T],
        "loss_curve": [interval(c) for c in np.array([r["test_loss"] for r in rows]).T],
    }
    if name in dvn_common.DVN_SAMPLERS:
      entry["spearman"] = interval(_spearman(rows))
      entry["first_order_spearman"] = interval([r["first_order_spearman"] for r in rows])
    if rows[0]["flipped_probability"] is not None:
      entry["flipped_probability"] = interval([r["flipped_probability"] for r in rows])
    out[name] = entry
  return out


def dataset_claims(acc: dict[str, np.ndarray]) -> dict[str, dict]:
  """The paper's accuracy claims on paired per-seed accuracy differences (one dataset, or averaged)."""
  pairs = (
      ("DVN beats uniform", "dvn", "uniform", PAPER_GAIN),
      ("DVN beats gradient-norm sampling", "dvn", "grad-norm", PAPER_GAIN),
      ("softmax normalisation helps", "dvn", "dvn-unnormalised", "needed"),
      ("embedding-norm feature helps", "dvn", "dvn-no-embedding-norm", "+2 to +4 points"),
  )
  return {
      name: claim(f"{a} - {b}", acc[a] - acc[b], paper, scale=100)
      for name, a, b, paper in pairs if a in acc and b in acc
  }


def noise_claims(noise: dict[float, dict[str, list[dict]]]) -> dict[str, dict]:
  """Label noise against 0%: the DVN's accuracy and Spearman, and its gain over uniform, per level."""
  clean = noise[0.0]
  out = {}
  for level, per_sampler in noise.items():
    if level == 0.0:
      continue
    pct = f"{level:.0%}"
    out[f"{pct} noise lowers DVN accuracy"] = claim(
        f"dvn at 0% - at {pct}", _final(clean["dvn"]) - _final(per_sampler["dvn"]), "degrades", scale=100
    )
    out[f"{pct} noise lowers DVN Spearman"] = claim(
        f"dvn at 0% - at {pct}", _spearman(clean["dvn"]) - _spearman(per_sampler["dvn"]), "degrades"
    )
    out[f"DVN beats uniform at {pct} noise"] = claim(
        "dvn - uniform", _final(per_sampler["dvn"]) - _final(per_sampler["uniform"]), "-", scale=100
    )
  return out


def format_table(summary: dict[str, Any]) -> str:
  """Text tables: accuracy, loss and Spearman per dataset and sampler; the claims; the label-noise ablation."""
  lines = []
  header = f"{'sampler':<24}{'test acc %':>16}{'test loss':>16}{'Spearman':>16}{'first-order vs true':>21}"
  for spec, result in summary["datasets"].items():
    lines += [f"{SHORT_NAMES.get(spec, spec)}", header, "-" * len(header)]
    for name, m in result["samplers"].items():
      lines.append(
          f"{name:<24}{ci_text(m['accuracy'], 100):>16}{ci_text(m['loss'], digits=3):>16}"
          f"{ci_text(m.get('spearman'), digits=3):>16}{ci_text(m.get('first_order_spearman'), digits=3):>21}"
      )
    lines += dvn_common.claim_lines(result["claims"]) + [""]
  if "overall" in summary:
    lines += ["all datasets (mean of per-seed differences, points)"] + dvn_common.claim_lines(summary["overall"])
    lines.append("")
  if summary.get("noise"):
    lines.append(f"label noise on {SHORT_NAMES.get(summary['noise_dataset'], summary['noise_dataset'])}")
    head = f"{'noise':<8}{'sampler':<12}{'test acc %':>16}{'Spearman':>16}{'p on flipped':>16}"
    lines += [head, "-" * len(head)]
    for level, result in summary["noise"].items():
      for name, m in result.items():
        lines.append(
            f"{level:<8}{name:<12}{ci_text(m['accuracy'], 100):>16}{ci_text(m.get('spearman'), digits=3):>16}"
            f"{ci_text(m.get('flipped_probability'), digits=3):>16}"
        )
    lines += dvn_common.claim_lines(summary["noise_claims"]) + [""]
  lines.append(
      f"mean +- 95% CI over {len(summary['seeds'])} seeds, on the test split after the last epoch; differences"
      " in accuracy points (Spearman differences raw). p on flipped: the sampler's final probability mass"
      " on flipped samples (uniform: the noise rate)."
  )
  return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
  """Per dataset: test loss (top) and accuracy (bottom) per epoch for every sampler, with 95% intervals."""
  plt = runs.pyplot()
  specs = list(summary["datasets"])
  fig, axes = plt.subplots(2, len(specs), figsize=(5 * len(specs), 7), squeeze=False)
  for col, spec in enumerate(specs):
    for name, m in summary["datasets"][spec]["samplers"].items():
      for row, key in enumerate(("loss_curve", "accuracy_curve")):
        curve = m[key]
        epochs = np.arange(1, len(curve) + 1)
        mean = np.array([c["mean"] for c in curve])
        half = np.nan_to_num(np.array([c["half_width"] for c in curve]))
        axes[row, col].plot(epochs, mean, marker="o", label=name)
        axes[row, col].fill_between(epochs, mean - half, mean + half, alpha=0.15)
    axes[0, col].set(title=SHORT_NAMES.get(spec, spec), ylabel="test loss")
    axes[1, col].set(xlabel="epoch", ylabel="test accuracy")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{NAME}, {len(summary['seeds'])} seeds (95% CI)")
  runs.save_figure(fig, path)


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every dataset, sampler and seed, then the label-noise ablation (one unit per sampler and seed, skipped when
  the folder has it finished); write the run folder."""
  _, units = runs.open_run(out_dir, config)
  per_dataset: dict[str, dict[str, list[dict]]] = {}
  plan = dataset_plan(config)
  for spec, options in plan.items():
    datasets = {seed: data.load(spec, seed=seed, **options) for seed in config.seeds}
    first = datasets[config.seeds[0]]
    model = make_model(config.model, first, config.hidden, options)
    per_dataset[spec] = {}
    for name in config.samplers:
      method = dvn_common.make_sampler(name, model, train.loss_fn_for(first), config.sampler)
      per_dataset[spec][name] = run_sampler(units, spec, name, method, model, datasets, config, {"dataset": spec})

  noise_spec = next(iter(plan))
  noise: dict[float, dict[str, list[dict]]] = {}
  if config.noise_levels:
    noise[0.0] = {name: per_dataset[noise_spec][name] for name in NOISE_SAMPLERS}
    clean = {seed: data.load(noise_spec, seed=seed, **plan[noise_spec]) for seed in config.seeds}
    model = make_model(config.model, clean[config.seeds[0]], config.hidden, plan[noise_spec])
    loss_fn = train.loss_fn_for(clean[config.seeds[0]])
    for level in config.noise_levels[1:]:
      noisy = {seed: data.synthetic.label_noise(d, level, seed=seed) for seed, d in clean.items()}
      noise[level] = {
          name: run_sampler(
              units, f"{noise_spec}/noise={level:g}", name,
              dvn_common.make_sampler(name, model, loss_fn, config.sampler), model, noisy, config,
              {"dataset": noise_spec, "label_noise": level},
          )
          for name in NOISE_SAMPLERS
      }

  datasets = {}
  for spec, per_sampler in per_dataset.items():
    acc = {name: _final(rows) for name, rows in per_sampler.items()}
    datasets[spec] = {"samplers": summarise_runs(per_sampler), "claims": dataset_claims(acc)}
  summary: dict[str, Any] = {"seeds": list(config.seeds), "datasets": datasets}
  if len(per_dataset) > 1:
    mean_acc = {
        name: np.mean([_final(per_sampler[name]) for per_sampler in per_dataset.values()], axis=0)
        for name in config.samplers
    }
    summary["overall"] = dataset_claims(mean_acc)
  if noise:
    summary["noise_dataset"] = noise_spec
    summary["noise"] = {f"{level:.0%}": summarise_runs(per_sampler) for level, per_sampler in noise.items()}
    summary["noise_claims"] = noise_claims(noise)
  summary["per_seed"] = {"datasets": per_dataset, "noise": {f"{k:.0%}": v for k, v in noise.items()}}
  summary["table"] = format_table(summary)
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, out_dir / "dvn_text.png")
  return summary
