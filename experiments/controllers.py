"""Signals as controllers: the five interventions of the essay against uniform training, with equivalence tests.

Command:   metasel run controllers            (about an hour on a 2-core CPU)
Quick:     metasel run controllers --quick    (seconds; used by the tests)

The essay reports that five ways of controlling training with per-sample signals (static front-loading,
dynamic rescoring, entropy rescoring, mild and aggressive gradient weighting) never beat uniform
training. Here every arm (`metasel.controllers`, see `controllers_arms.ARMS`) trains on AG News and
DBpedia (2,000 training, 1,000 validation and 1,000 test rows of the shared files; each seed draws its own
stratified split) at three scales: TF-IDF MLPs 64 and 256-256 wide, and a 2-block Transformer of width
32 on token ids. Every arm has the same step budget (6 passes of batch 32) and the same Adam schedule,
cosine-decayed to zero, so gains from an undertrained baseline cannot count; a seed fixes init, split
and base order for every arm (paired runs; importance sampling's presample of 3b walks the pool's passes three times as fast). The
curriculum is sorted by each sample's loss at the end of a one-pass uniform pilot run (its own init).

Metrics on the validation split, evaluated 12 times: final accuracy (mean of the last 3 evaluations),
area under the accuracy curve normalised to [0, 1], and steps to 95% of the paired uniform run's final
accuracy (a run that never gets there is counted at the budget and flagged censored). Per arm and cell
(dataset x scale): paired differences (positive = better than uniform) with 95% intervals; superiority
and inferiority by one-sided paired t-tests, Holm-corrected over metrics x arms x datasets x scales;
equivalence by TOST with margins fixed here (0.5 points of accuracy and AULC, 10% of steps on a log
scale). Verdicts: beats uniform / equivalent to uniform / worse / inconclusive (`stats.comparison_verdict`).
The first `pilot_seeds` seeds estimate the spread of the differences and the seeds TOST needs for 80% power.

Controls: the random-score arm must come out equivalent to uniform (negative control); with 30% label
noise and a 2-pass budget (AG News, the narrow MLP), where curricula are reported to help, the summary
says whether any controller beats uniform (positive control).

Writes config.json, metrics.jsonl (per-evaluation records), summary.json and controllers.png.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from metasel import data, runs, stats
from metasel_experiments import check_model, data_file, dataset_plan, interval, make_model, shared_data, with_representation
from metasel_experiments import controllers_arms as arms_lib
from metasel_experiments import controllers_report as report
from metasel_experiments.controllers_arms import ArmSettings, Scale

NAME = "controllers"
AG_NEWS = f"csv:{shared_data('ag_news/test.csv')}"
DBPEDIA = f"csv:{shared_data('dbpedia_14/validation.csv')}"
SIZES = {"n_train": 2000, "n_val": 1000, "n_test": 1000, "max_features": 2000, "max_length": 48, "vocab_size": 5000}
SCALES = (
    Scale("mlp-narrow", "mlp", (64,)),
    Scale("mlp-wide", "mlp", (256, 256)),
    Scale("transformer", "transformer", (32, 32)),
)
MARGINS = {"accuracy": 0.005, "aulc": 0.005, "steps": math.log(1.1)}


@dataclasses.dataclass(frozen=True)
class Control:
  """The positive control: `noise` of the training labels flipped and a short budget of `passes`, on the first
  dataset and scale."""

  noise: float = 0.3
  passes: int = 2


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the experiment, margins included (fixed before the run); `get_config(quick=True)` shrinks it.

  `dataset` (the command line's --dataset) replaces `datasets` with that one, its options being
  `options[dataset]` updated by `dataset_options`; `model` (--model) keeps only the scales of that model.
  """

  datasets: tuple[str, ...] = (AG_NEWS, DBPEDIA)
  options: dict = dataclasses.field(default_factory=lambda: {AG_NEWS: dict(SIZES), DBPEDIA: dict(SIZES)})
  dataset: str | None = None
  dataset_options: dict = dataclasses.field(default_factory=dict)
  model: str | None = None
  scales: tuple[Scale, ...] = SCALES
  arms: tuple[str, ...] = arms_lib.ARMS
  arm_settings: ArmSettings = ArmSettings()
  batch_size: int = 32
  passes: int = 6
  evaluations: int = 12
  margins: dict = dataclasses.field(default_factory=lambda: dict(MARGINS))
  alpha: float = 0.05
  pilot_seeds: int = 5
  control: Control | None = Control()
  seeds: tuple[int, ...] = tuple(range(10))


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      datasets=("mixture",),
      options={"mixture": {"n_real": 192, "n_synthetic": 0, "n_val": 64, "n_test": 64, "dim": 16}},
      scales=(Scale("mlp", "mlp", (16,), 1e-2),),
      arms=("uniform", "curriculum", "importance-unbiased", "infobatch", "random-scores"),
      batch_size=16,
      passes=2,
      evaluations=4,
      pilot_seeds=2,
      control=Control(noise=0.3, passes=1),
      seeds=(0, 1, 2),
  )


def plan(config: Config) -> dict[str, dict]:
  """Dataset spec -> loader options (before each scale's text representation)."""
  return dataset_plan(dataclasses.replace(config, model="mlp"))


def scales(config: Config) -> tuple[Scale, ...]:
  """The scales to run: all, or those of `config.model`."""
  return tuple(s for s in config.scales if config.model is None or s.model == config.model)


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if len(config.seeds) < 2 or len(set(config.seeds)) != len(config.seeds):
    raise ValueError(f"seeds must name at least 2 distinct seeds for paired tests, got {config.seeds!r}")
  if not 2 <= config.pilot_seeds <= len(config.seeds):
    raise ValueError(f"pilot_seeds must lie in [2, {len(config.seeds)}] (the first seeds of the run), got {config.pilot_seeds!r}")
  if config.dataset is None and config.dataset_options:
    raise ValueError(f"dataset_options {config.dataset_options!r} apply to `dataset`, which is not set")
  if not scales(config):
    raise ValueError(f"no scale has model {config.model!r}; expected one of {sorted({s.model for s in config.scales})}")
  if sorted(config.margins) != sorted(arms_lib.METRICS) or any(not m > 0 for m in config.margins.values()):
    raise ValueError(f"margins must give a positive margin for each of {arms_lib.METRICS}, got {config.margins!r}")
  stats.tost([0.0, 1.0], 1.0, config.alpha)  # checks alpha
  arms_lib.check_arms(config.arms, config.arm_settings)
  for name in ("batch_size", "passes", "evaluations"):
    if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
      raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
  if config.control is not None and not (0 <= config.control.noise < 1 and config.control.passes >= 1):
    raise ValueError(f"control needs a noise rate in [0, 1) and at least 1 pass, got {config.control!r}")
  if config.dataset is None and len(set(config.datasets)) != len(config.datasets):
    raise ValueError(f"datasets {config.datasets!r} name a dataset twice; expected distinct specs")
  for spec, options in plan(config).items():
    path = data_file(spec)
    if path is not None and not Path(path).expanduser().is_file():
      raise FileNotFoundError(f"dataset {spec!r} reads {path}, which does not exist; provide the file or drop {spec!r} from datasets")
    for scale in scales(config):
      dataset = data.load(spec, seed=config.seeds[0], **with_representation(spec, options, scale.model))
      if dataset.task != "classification":
        raise ValueError(f"{NAME} needs classification data, got regression data {spec!r}")
      check_model(scale.model, dataset)
      size = config.batch_size * (config.arm_settings.presample if set(arms_lib.PRESAMPLED) & set(config.arms) else 1)
      if size > len(dataset.train):
        raise ValueError(
            f"dataset {spec!r} has {len(dataset.train)} training samples; batch_size={config.batch_size} (presample"
            f" {size}) needs more"
        )
      for passes in (config.passes, config.control.passes if config.control else config.passes):
        arms_lib.budget(len(dataset.train), config.batch_size, passes, config.evaluations)


def run_cell(units, key: str, config: Config, scale: Scale, datasets: dict[int, data.Dataset], passes: int, options, log_tags) -> dict[str, list]:
  """Every arm on every seed of one cell (one unit each). Arms run outer: an arm's method record is the same for
  every seed (its per-seed data, such as the curriculum's order, lives in its initial state), so its epoch
  compiles once per cell."""
  first = datasets[config.seeds[0]]
  model = make_model(scale.model, first, scale.hidden, options)
  num_train = len(first.train)
  budget = arms_lib.budget(num_train, config.batch_size, passes, config.evaluations)
  settings = config.arm_settings
  pilots = {}
  if "curriculum" in config.arms:
    for seed, dataset in datasets.items():
      pilots[seed] = units.run(
          f"{key}/pilot/seed={seed}",
          lambda log, dataset=dataset, seed=seed: arms_lib.pilot_scores(model, dataset, settings, config.batch_size, scale, seed),
      )
  runs_by_arm = {}
  for arm in config.arms:
    rows = []
    for seed, dataset in datasets.items():
      def compute(log, arm=arm, seed=seed, dataset=dataset):
        method = arms_lib.make_arm(arm, settings, budget, config.batch_size, pilots.get(seed))
        train_config = arms_lib.train_config(arm, settings, budget, config.batch_size, scale, seed)
        tags = {**log_tags, "arm": arm, "seed": seed}
        return arms_lib.run_arm(method, model, dataset, train_config, lambda r: log({**tags, **r}))

      rows.append(units.run(f"{key}/{arm}/seed={seed}", compute))
    runs_by_arm[arm] = rows
  return runs_by_arm


def cell_results(runs_by_arm: dict[str, list], margins: dict, pilot_seeds: int) -> dict[str, Any]:
  """Per arm: metric intervals, paired differences against uniform and their raw p-values; the pilot's seed count."""
  reference = runs_by_arm["uniform"]
  metrics = {arm: [arms_lib.run_metrics(r, u) for r, u in zip(rows, reference)] for arm, rows in runs_by_arm.items()}
  out = {}
  for arm, rows in metrics.items():
    entry = {m: interval([r[m] for r in rows]) for m in ("accuracy", "aulc", "test_accuracy", "steps")}
    entry["censored"] = int(sum(r["censored"] for r in rows))
    entry["seconds"] = interval([r["seconds"] for r in runs_by_arm[arm]])
    entry["importance_active"] = interval([r["importance_active"] for r in runs_by_arm[arm]])
    if arm != "uniform":
      diffs = arms_lib.differences(rows, metrics["uniform"])
      entry["differences"] = {m: interval(d) for m, d in diffs.items()}
      entry["per_seed"] = {m: d.tolist() for m, d in diffs.items()}
      entry["p_superior"] = {m: stats.one_sided_p(d, "greater") for m, d in diffs.items()}
      entry["p_inferior"] = {m: stats.one_sided_p(d, "less") for m, d in diffs.items()}
      entry["p_tost"] = {m: stats.tost(d, margins[m])["p"] for m, d in diffs.items()}
      entry["pilot_seeds_needed"] = {
          m: stats.tost_seeds(float(np.std(d[:pilot_seeds], ddof=1)), margins[m]) for m, d in diffs.items()
      }
    out[arm] = entry
  return out


def against_controls(runs_by_arm: dict[str, list], config: Config) -> dict[str, Any]:
  """Each arm of `MACHINERY_CONTROLS` against its no-information control (in the reference's place): what the
  signal adds to the machinery."""
  out = {}
  for arm, control in arms_lib.MACHINERY_CONTROLS.items():
    if arm in runs_by_arm and control in runs_by_arm:
      pair = cell_results({"uniform": runs_by_arm[control], arm: runs_by_arm[arm]}, config.margins, config.pilot_seeds)
      out[arm] = {**pair[arm], "control": control}
  return out


def load_seeds(spec: str, options: dict, scale: Scale, seeds, noise: float = 0.0) -> tuple[dict[int, data.Dataset], dict]:
  """Each seed's dataset for the scale's representation (labels flipped at `noise`), and the loader options."""
  options = with_representation(spec, options, scale.model)
  datasets = {seed: data.load(spec, seed=seed, **options) for seed in seeds}
  if noise:
    datasets = {seed: data.synthetic.label_noise(d, noise, seed=seed) for seed, d in datasets.items()}
  return datasets, options


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every cell, arm and seed, then the positive control (one unit per run; a resumed folder skips finished ones)."""
  _, units = runs.open_run(out_dir, config)
  cells: dict[str, dict] = {}
  signal_effects: dict[str, dict] = {}
  seconds: dict[str, float] = {}
  for spec, options in plan(config).items():
    for scale in scales(config):
      datasets, scale_options = load_seeds(spec, options, scale, config.seeds)
      key = f"{spec}/{scale.name}"
      runs_by_arm = run_cell(units, key, config, scale, datasets, config.passes, scale_options, {"dataset": spec, "scale": scale.name})
      cells[key] = {"dataset": spec, "scale": scale.name, "arms": cell_results(runs_by_arm, config.margins, config.pilot_seeds)}
      signal_effects[key] = {"dataset": spec, "scale": scale.name, "arms": against_controls(runs_by_arm, config)}
      seconds[key] = float(sum(r["seconds"] for rows in runs_by_arm.values() for r in rows))
  summary: dict[str, Any] = {"seeds": list(config.seeds), "margins": config.margins, "alpha": config.alpha}
  summary["cells"] = report.with_verdicts(cells, config.alpha)
  summary["signal_effects"] = report.with_verdicts(signal_effects, config.alpha)
  if config.control is not None:
    spec, options = next(iter(plan(config).items()))
    scale = scales(config)[0]
    datasets, scale_options = load_seeds(spec, options, scale, config.seeds, config.control.noise)
    key = f"control/{spec}/{scale.name}"
    tags = {"dataset": spec, "scale": scale.name, "label_noise": config.control.noise}
    runs_by_arm = run_cell(units, key, config, scale, datasets, config.control.passes, scale_options, tags)
    control = {key: {"dataset": spec, "scale": scale.name, "arms": cell_results(runs_by_arm, config.margins, config.pilot_seeds)}}
    summary["control"] = report.with_verdicts(control, config.alpha)
    seconds[key] = float(sum(r["seconds"] for rows in runs_by_arm.values() for r in rows))
  summary["training_seconds"] = seconds
  summary["conclusions"] = report.conclusions(summary)
  summary["seeds_needed"] = report.seeds_needed(summary["cells"])
  summary["table"] = report.format_table(summary)
  runs.write_json(out_dir / "summary.json", summary)
  report.plot(summary, out_dir / "controllers.png")
  return summary
