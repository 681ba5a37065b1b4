"""Influence fidelity: does layer-aware influence (LAI) rank training samples like ghost influence, and cheaper?

Command:   metasel run influence-fidelity            (about 10 minutes on a 2-core CPU; see "Time" below)
Quick:     metasel run influence-fidelity --quick    (about 15 seconds; used by the tests)

Settings (`influence_common.SETTINGS`): the generated `mixture` and `digits` (MLP 128-128), AG News as
TF-IDF (MLP 128-128) and as token ids (Transformer of width 64 and depth 2); 1,000 training, 200
validation samples each. Label noise on the training part only: none, and at 20% and 40% both cyclic
y -> (y + 1) mod C and symmetric (a uniformly drawn other class), on every setting. Each (setting,
noise, seed) trains with plain uniform batches (Adam 1e-3, batch 32, 8 epochs) and, after epochs 1, 4
and 8, scores the same fixed 4 batches of 64 training samples against one fixed clean validation batch
of 32 with every scorer:

  ghost          exact <grad l_i, grad L_V> (first-order In-Run Data Shapley), by ghost dot products
  lai            LAI over every dense layer (the outer-product form: the authors' pairwise numbers)
  lai-last       LAI over the last dense layer only (its exact ghost term)
  lai-means      the authors' factorised variant (g_i . mean g_V) sum_l (a_i . mean a_V)
  lai-self       LAI against the training batch itself (reference="batch": no validation set)
  contribution   the exact one-step contribution L_V(theta) - L_V(theta - eta grad l_i), eta = the
                 learning rate (`contributions.contributions`, method="vmap")
  (lai-pairwise, the authors' pairwise form of lai, is computed only to check it equals lai, and timed.)

Per scorer and checkpoint, over the 256 scored samples (scores of one checkpoint share params and the
validation batch, so they are comparable across the scoring batches; lai-self's reference is each
sample's own batch): Spearman and Kendall tau against ghost and against the exact contribution, the
overlap of the top 10% with ghost's, the share of samples whose sign matches ghost's (and the
contribution's), the share of negative scores (how often the authors' rule "keep score >= 0" drops a
sample), and the AUROC of the score for the flipped labels (low score = flipped; 0.5 is chance). Per
setting, at the last checkpoint of the clean runs: each scorer's scoring time on one batch (compiled,
median of 5 calls, block_until_ready; the scorer computes its own forward/backward pass, no tape
reused) and the memory XLA's compiled program needs beyond its arguments. Every number is the mean and
95% interval over 8 seeds (seed = data draw, noise draw, init, batch order and the scored samples).
At eta = 1e-3 the exact contribution is nearly first order: ghost ranks almost as it does (Spearman
0.95 to 1.0 in the sizing runs), so ghost's own row is read against it.

Claims, with verdicts derived from the intervals (`stats.verdict` on value - threshold): per setting and
noise (a) LAI ranks like ghost: Spearman(lai, ghost) at each checkpoint against the authors' 0.91 on
GPT-Neo (threshold 0.9); LAI against ghost on the exact contribution (Spearman difference vs 0); per
setting, LAI's scoring time over ghost's against 1; (c) the sign rule rarely fires late: lai's negative
share at the last checkpoint below 1% (the authors' released scores: 0.1%); and which layer set agrees
best: lai (all layers) minus lai-last and minus lai-means in Spearman with ghost at the last checkpoint.

Time: 9.7 minutes on the 2-core CPU (measured, alone), 90% of it the transformer, most of that the
exact contributions (`contribution_method="vmap"`, about 2 x faster there than "ghost", with the same
numbers). Cut from the issue's grid to fit: 8 epochs, 3 checkpoints, 4 scoring batches of 64, 8 seeds,
MLPs of 128-128, the transformer at width 64 and depth 2.

Writes config.json, metrics.jsonl (one record per setting, noise, seed and checkpoint, and the timings),
summary.json and influence_fidelity.png.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from metasel import adapters, contributions, data, influence, runs, stats, train
from metasel.data import sampling
from metasel_experiments import ci_text, data_file, influence_common, interval

NAME = "influence-fidelity"
SCORERS = ("ghost", "lai", "lai-last", "lai-means", "lai-self", "contribution")
TIMED = ("ghost", "lai", "lai-last", "lai-means", "lai-pairwise", "lai-self", "contribution")
LAYER_SETS = ("lai", "lai-last", "lai-means")
METRICS = (
    "spearman_ghost", "kendall_ghost", "spearman_contribution", "kendall_contribution", "top10_ghost",
    "sign_agreement_ghost", "sign_agreement_contribution", "negative_share", "auroc_flipped",
)
PAPER_SPEARMAN = "0.91 +- 0.09 (GPT-Neo pretraining, 100 checkpoints)"
PAPER_NEGATIVE = "0.1% of released LAI scores <= 0"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the experiment; `get_config(quick=True)` shrinks everything for tests.

  `settings` name entries of `influence_common.SETTINGS`; `overrides` maps a setting name to loader
  options replacing its defaults. Every setting gets `noise_levels` (0 first, the clean reference) of
  cyclic noise; the settings in `symmetric_settings` also get them as symmetric noise. MLPs have
  `mlp_hidden` widths, the transformer width `transformer_hidden[0]` and depth `len(transformer_hidden)`.
  Scoring takes `score_batches` fixed batches of `score_batch_size` training samples and one validation
  batch of `score_val_size` after each epoch in `checkpoints`.
  """

  settings: tuple[str, ...] = tuple(influence_common.SETTINGS)
  overrides: dict = dataclasses.field(default_factory=dict)
  noise_levels: tuple[float, ...] = (0.0, 0.2, 0.4)
  symmetric_settings: tuple[str, ...] = tuple(influence_common.SETTINGS)
  mlp_hidden: tuple[int, ...] = (128, 128)
  transformer_hidden: tuple[int, ...] = (64, 64)
  epochs: int = 8
  checkpoints: tuple[int, ...] = (1, 4, 8)
  batch_size: int = 32
  val_batch_size: int = 32
  learning_rate: float = 1e-3
  contribution_method: str = "vmap"  # or "ghost": the same numbers; vmap is about 2x faster on the transformer here
  score_batches: int = 4
  score_batch_size: int = 64
  score_val_size: int = 32
  timing_calls: int = 5
  spearman_threshold: float = 0.9
  negative_threshold: float = 0.01
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      settings=("mixture",),
      overrides={"mixture": {"n_real": 160, "n_val": 48, "n_test": 64, "dim": 16}},
      noise_levels=(0.0, 0.4),
      symmetric_settings=("mixture",),
      mlp_hidden=(16,),
      epochs=2,
      checkpoints=(1, 2),
      batch_size=16,
      val_batch_size=16,
      score_batches=2,
      score_batch_size=16,
      score_val_size=8,
      timing_calls=2,
      seeds=(0, 1),
  )


def conditions(config: Config, setting: str) -> list[tuple[str, float]]:
  """The (noise kind, level) pairs a setting runs: clean first, then cyclic, then (if listed) symmetric."""
  out = [("none", 0.0)]
  kinds = ("cyclic", "symmetric") if setting in config.symmetric_settings else ("cyclic",)
  return out + [(kind, level) for kind in kinds for level in config.noise_levels[1:]]


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  influence_common.check_settings(config.settings, "cyclic")
  if len(set(config.settings)) != len(config.settings):
    raise ValueError(f"settings {config.settings!r} name a setting twice; expected distinct names")
  known = list(influence_common.SETTINGS)
  unknown = [name for name in (*config.symmetric_settings, *config.overrides) if name not in known]
  if unknown:
    raise ValueError(f"symmetric_settings / overrides name unknown settings {unknown}; expected some of {known}")
  levels = config.noise_levels
  if not levels or levels[0] != 0 or any(not (isinstance(v, (int, float)) and 0 <= v < 1) for v in levels):
    raise ValueError(f"noise_levels must start with 0 (the clean reference) and lie in [0, 1), got {levels!r}")
  sizes = (
      "epochs", "batch_size", "val_batch_size", "score_batches", "score_batch_size", "score_val_size", "timing_calls",
  )
  for name in sizes:
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  points = config.checkpoints
  if not points or list(points) != sorted(set(points)) or points[0] < 1 or points[-1] > config.epochs:
    raise ValueError(f"checkpoints must be increasing epochs in [1, epochs={config.epochs}], got {points!r}")
  for name in ("mlp_hidden", "transformer_hidden"):
    widths = getattr(config, name)
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
      raise ValueError(f"{name} must be positive layer widths, got {widths!r}")
  if config.contribution_method not in ("ghost", "vmap"):
    raise ValueError(f"contribution_method must be 'ghost' or 'vmap', got {config.contribution_method!r}")
  if not (isinstance(config.learning_rate, (int, float)) and config.learning_rate > 0):
    raise ValueError(f"learning_rate must be positive, got {config.learning_rate!r}")
  for setting in config.settings:
    spec = influence_common.SETTINGS[setting]
    path = data_file(spec.spec)
    if path is not None and not Path(path).expanduser().is_file():
      raise FileNotFoundError(
          f"setting {setting!r} reads {path}, which does not exist; provide the file or drop {setting!r}"
      )
    overrides = config.overrides.get(setting)
    dataset = influence_common.load(spec, config.seeds[0], noise=0.0, kind="cyclic", overrides=overrides)
    if dataset.task != "classification":
      raise ValueError(f"setting {setting!r} is not a classification dataset")
    scored = config.score_batches * config.score_batch_size
    if scored > len(dataset.train):
      raise ValueError(
          f"setting {setting!r}: scoring {config.score_batches} x {config.score_batch_size} = {scored} samples needs"
          f" that many training samples, but the training split has {len(dataset.train)}"
      )
    if config.score_val_size > len(dataset.val):
      raise ValueError(
          f"setting {setting!r}: score_val_size={config.score_val_size} is larger than the validation split"
          f" ({len(dataset.val)} samples)"
      )
    train_config(config, config.seeds[0]).check(dataset)
    influence_common.model_for(spec, dataset, influence_common.hidden_for(config, setting), overrides)


def train_config(config: Config, seed: int) -> train.TrainConfig:
  """The training settings (Adam at `learning_rate`, no dynamics tracker), for `TrainConfig.check`."""
  return train.TrainConfig(
      epochs=config.epochs, batch_size=config.batch_size, val_batch_size=config.val_batch_size,
      optimizer="adam", learning_rate=config.learning_rate, seed=seed, track_dynamics=False,
  )


# ----------------------------------------------------------------------------------------------------
# Compiled programs: one set per setting, reused across noise conditions, seeds and checkpoints


class Programs:
  """A setting's compiled programs: the training epoch, a checkpoint's scoring, and each scorer alone."""

  def __init__(self, model, loss_fn, config: Config):
    self.model, self.loss_fn, self.config = model, loss_fn, config
    self.tx = train.make_optimizer("adam", config.learning_rate)
    epoch = train.make_epoch(train.make_step(model, loss_fn, self.tx), config.val_batch_size)
    self.epoch = jax.jit(epoch, donate_argnums=0)
    self.evaluate = jax.jit(lambda p, x, y: train.evaluate(model, loss_fn, p, x, y))
    named = influence_common.scorers(model, loss_fn)
    named["lai-pairwise"] = influence.lai_scorer(model, loss_fn, form="pairwise")
    named["lai-self"] = influence.lai_scorer(model, loss_fn, reference="batch")
    eta, method = config.learning_rate, config.contribution_method

    def contribution(params, x, y, val_x, val_y):
      return contributions.contributions(model, loss_fn, params, x, y, val_x, val_y, eta, method=method)

    self.functions = {name: named[name].scores for name in TIMED if name != "contribution"}
    self.functions["contribution"] = contribution

    def score(params, xs, ys, val_x, val_y):
      def one(batch):
        return {name: f(params, *batch, val_x, val_y) for name, f in self.functions.items()}

      return jax.lax.map(one, (xs, ys))

    self.score = jax.jit(score)
    self._compiled: dict[str, Any] = {}

  def compiled(self, name: str, args) -> Any:
    """The scorer `name` alone, compiled once for these argument shapes."""
    if name not in self._compiled:
      self._compiled[name] = jax.jit(self.functions[name]).lower(*args).compile()
    return self._compiled[name]


def time_scorers(programs: Programs, args, calls: int) -> dict[str, dict[str, float | None]]:
  """Per timed scorer: median milliseconds of `calls` compiled calls on one batch, and compiled memory (MB)."""
  out = {}
  for name in TIMED:
    fn = programs.compiled(name, args)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    out[name] = {"ms": 1e3 * statistics.median(times), "memory_mb": runs.compiled_memory_mb(fn)}
  return out


# ----------------------------------------------------------------------------------------------------
# Metrics of one checkpoint


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
  """Share of the top `fraction` (at least one) of `a` that is also in the top of `b`."""
  k = max(1, math.ceil(fraction * a.size))
  return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(fn(a, b)[0])


def checkpoint_metrics(scores: dict[str, np.ndarray], flipped: np.ndarray) -> dict[str, dict[str, float]]:
  """Per scorer of `SCORERS`: the `METRICS` of its scores (N,) against ghost's and the exact contribution's.

  Self-comparisons (ghost against ghost, the contribution against itself) are left out.
  """
  ghost, exact = scores["ghost"], scores["contribution"]
  out = {}
  for name in SCORERS:
    s = scores[name]
    m = {}
    if name != "ghost":
      m["spearman_ghost"] = _correlation(scipy.stats.spearmanr, s, ghost)
      m["kendall_ghost"] = _correlation(scipy.stats.kendalltau, s, ghost)
      m["top10_ghost"] = top_overlap(s, ghost)
      m["sign_agreement_ghost"] = float(np.mean(np.sign(s) == np.sign(ghost)))
    if name != "contribution":
      m["spearman_contribution"] = _correlation(scipy.stats.spearmanr, s, exact)
      m["kendall_contribution"] = _correlation(scipy.stats.kendalltau, s, exact)
      m["sign_agreement_contribution"] = float(np.mean(np.sign(s) == np.sign(exact)))
    m["negative_share"] = float(np.mean(s < 0))
    m["auroc_flipped"] = stats.auc(-s, flipped)
    out[name] = m
  return out


# ----------------------------------------------------------------------------------------------------
# One training run with its checkpoints


def run_seed(programs: Programs, dataset: data.Dataset, config: Config, seed: int, timed: bool) -> dict[str, Any]:
  """Train one seed with uniform batches, scoring the fixed batches at each checkpoint.

  Returns per checkpoint epoch the metrics of each scorer, LAI's outer-vs-pairwise relative difference
  and the test accuracy; with `timed`, also the scorers' timings at the last checkpoint.
  """
  model = programs.model
  init_key, loop_key, order_key = jax.random.split(jax.random.key(seed), 3)
  params = adapters.init(model, init_key, dataset.input_shape, dataset.train.x.dtype)
  state = train.LoopState(params, programs.tx.init(params), (), None, jnp.zeros((), jnp.int32), loop_key)
  state = jax.tree.map(jnp.copy, state)
  arrays = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  rng = np.random.default_rng([seed, 7])
  rows = rng.permutation(len(dataset.train))[: config.score_batches * config.score_batch_size]
  val_rows = rng.permutation(len(dataset.val))[: config.score_val_size]
  shape = (config.score_batches, config.score_batch_size)
  xs = jnp.asarray(dataset.train.x[rows]).reshape(*shape, *dataset.input_shape)
  ys = jnp.asarray(dataset.train.y[rows]).reshape(shape)
  val_x, val_y = jnp.asarray(dataset.val.x[val_rows]), jnp.asarray(dataset.val.y[val_rows])
  flipped = dataset.train.tier[rows] != data.CLEAN_TIER
  test_x, test_y = jnp.asarray(dataset.test.x), jnp.asarray(dataset.test.y)

  result: dict[str, Any] = {"checkpoints": {}}
  for epoch in range(config.epochs):
    batches = sampling.epoch_batches(jax.random.fold_in(order_key, epoch), len(dataset.train), config.batch_size)
    state, _ = programs.epoch(state, arrays, batches)
    if epoch + 1 not in config.checkpoints:
      continue
    raw = jax.device_get(programs.score(state.params, xs, ys, val_x, val_y))
    scores = {name: np.asarray(v, np.float64).reshape(-1) for name, v in raw.items()}
    scale = np.max(np.abs(scores["lai"])) or 1.0
    evaluation = jax.device_get(programs.evaluate(state.params, test_x, test_y))
    result["checkpoints"][epoch + 1] = {
        "scorers": checkpoint_metrics(scores, flipped),
        "outer_vs_pairwise": float(np.max(np.abs(scores["lai"] - scores["lai-pairwise"])) / scale),
        "test_accuracy": float(evaluation["accuracy"]),
    }
  if timed:
    result["timing"] = time_scorers(programs, (state.params, xs[0], ys[0], val_x, val_y), config.timing_calls)
  return result


# ----------------------------------------------------------------------------------------------------
# Summaries and claims


def verdict(values, threshold: float, above: bool) -> str:
  """stats.verdict of (values - threshold) (or threshold - values when `above` is False)."""
  diff = interval((np.asarray(values, np.float64) - threshold) * (1 if above else -1))
  return stats.verdict(diff)


def claim(
    statement: str, comparison: str, values, threshold: float, above: bool, paper: str, scale: float = 1.0
) -> dict:
  """A per-seed quantity, its interval, the threshold it is tested against, its verdict and the paper's number.

  "holds" when the interval lies above the threshold (below it when `above` is False), "does not hold"
  when it lies on the other side, else "no significant difference".
  """
  return {
      "statement": statement, "comparison": comparison, "value": interval(values), "threshold": threshold,
      "direction": "above" if above else "below", "verdict": verdict(values, threshold, above), "paper": paper,
      "scale": scale,
  }


def _per_seed(runs_: list[dict], epoch: int, scorer: str, metric: str) -> np.ndarray:
  return np.array([r["checkpoints"][epoch]["scorers"][scorer].get(metric, np.nan) for r in runs_], np.float64)


def summarise_condition(runs_: list[dict], config: Config) -> dict[str, Any]:
  """Intervals of every metric per checkpoint and scorer, test accuracy, and the condition's claims."""
  last = config.checkpoints[-1]
  checkpoints = {}
  for epoch in config.checkpoints:
    checkpoints[f"epoch {epoch}"] = {
        name: {
            metric: interval(_per_seed(runs_, epoch, name, metric))
            for metric in runs_[0]["checkpoints"][epoch]["scorers"][name]
        }
        for name in SCORERS
    }
  claims = {}
  for epoch in config.checkpoints:
    claims[f"LAI ranks like ghost at epoch {epoch}"] = claim(
        f"Spearman(lai, ghost) at epoch {epoch} exceeds {config.spearman_threshold}", "Spearman(lai, ghost)",
        _per_seed(runs_, epoch, "lai", "spearman_ghost"), config.spearman_threshold, True, PAPER_SPEARMAN,
    )
  claims["LAI tracks the exact contribution better than ghost"] = claim(
      "Spearman with the exact contribution, lai minus ghost, at the last checkpoint, is above 0",
      "Sp(lai, contr) - Sp(ghost, contr)",
      _per_seed(runs_, last, "lai", "spearman_contribution") - _per_seed(runs_, last, "ghost", "spearman_contribution"),
      0.0, True, "-",
  )
  claims["the sign rule rarely fires late"] = claim(
      f"lai's share of negative scores at epoch {last} is below {config.negative_threshold:.0%}",
      "negative share of lai (%)", _per_seed(runs_, last, "lai", "negative_share"), config.negative_threshold, False,
      PAPER_NEGATIVE, scale=100,
  )
  for other in LAYER_SETS[1:]:
    gap = _per_seed(runs_, last, "lai", "spearman_ghost") - _per_seed(runs_, last, other, "spearman_ghost")
    claims[f"all layers agree better than {other}"] = claim(
        f"Spearman with ghost at epoch {last}, lai minus {other}, is above 0", f"Sp(lai, ghost) - Sp({other}, ghost)",
        gap, 0.0, True, "-",
    )
  best = {name: float(np.nanmean(_per_seed(runs_, last, name, "spearman_ghost"))) for name in LAYER_SETS}
  return {
      "test_accuracy": interval([r["checkpoints"][last]["test_accuracy"] for r in runs_]),
      "outer_vs_pairwise_max": float(max(c["outer_vs_pairwise"] for r in runs_ for c in r["checkpoints"].values())),
      "checkpoints": checkpoints,
      "best_layer_set": max(best, key=lambda k: -np.inf if np.isnan(best[k]) else best[k]),
      "claims": claims,
  }


def summarise_timing(timings: list[dict]) -> dict[str, Any]:
  """Per timed scorer: milliseconds and the ratio to ghost as intervals over seeds, and compiled memory."""
  ghost = np.array([t["ghost"]["ms"] for t in timings])
  out = {}
  for name in TIMED:
    ms = np.array([t[name]["ms"] for t in timings])
    out[name] = {"ms": interval(ms), "ratio_to_ghost": interval(ms / ghost), "memory_mb": timings[0][name]["memory_mb"]}
  return out


def cost_claim(timings: list[dict]) -> dict:
  """LAI scores faster than ghost: the per-seed time ratio lai / ghost below 1."""
  ratio = np.array([t["lai"]["ms"] / t["ghost"]["ms"] for t in timings])
  return claim("lai's scoring time over ghost's is below 1", "time(lai) / time(ghost)", ratio, 1.0, False,
               "forward pass only; cheaper than ghost's backward pass")


def _by_condition(settings: dict, name: str) -> dict:
  """The claim `name` of every setting and noise condition: its value interval and verdict."""
  return {
      s: {
          cond: {"value": c["claims"][name]["value"], "verdict": c["claims"][name]["verdict"]}
          for cond, c in r["conditions"].items()
      }
      for s, r in settings.items()
  }


def collect_claims(settings: dict) -> dict[str, Any]:
  """The top-level answers: (a) LAI's Spearman with ghost per checkpoint and its cost ratio to ghost, LAI
  against ghost on the exact contribution, (c) the sign rule's firing rate late, and the best layer set."""
  return {
      "lai_ranks_like_ghost": {
          s: {
              cond: {
                  "spearman": {e: c["checkpoints"][e]["lai"]["spearman_ghost"] for e in c["checkpoints"]},
                  "verdicts": {k: v["verdict"] for k, v in c["claims"].items() if k.startswith("LAI ranks like ghost")},
              }
              for cond, c in r["conditions"].items()
          }
          for s, r in settings.items()
      },
      "lai_cheaper_than_ghost": {
          s: {"time_ratio": r["timing"]["lai"]["ratio_to_ghost"], "verdict": r["cost_claim"]["verdict"]}
          for s, r in settings.items()
      },
      "lai_tracks_contribution_better_than_ghost": _by_condition(
          settings, "LAI tracks the exact contribution better than ghost"
      ),
      "sign_rule_rarely_fires_late": _by_condition(settings, "the sign rule rarely fires late"),
      "all_layers_beat_last_layer": _by_condition(settings, "all layers agree better than lai-last"),
      "all_layers_beat_means": _by_condition(settings, "all layers agree better than lai-means"),
      "best_layer_set": {
          s: {cond: c["best_layer_set"] for cond, c in r["conditions"].items()} for s, r in settings.items()
      },
  }


def format_table(summary: dict[str, Any]) -> str:
  """Text tables: per setting the scoring cost, per noise condition every scorer's metrics at the last
  checkpoint, Spearman with ghost over training, and the claims with their verdicts."""
  lines = []
  short = {
      "spearman_ghost": "Sp(gh)", "kendall_ghost": "Kt(gh)", "spearman_contribution": "Sp(ct)",
      "kendall_contribution": "Kt(ct)", "top10_ghost": "top10", "sign_agreement_ghost": "sign=gh",
      "sign_agreement_contribution": "sign=ct", "negative_share": "neg %", "auroc_flipped": "AUROC",
  }
  for setting, result in summary["settings"].items():
    lines.append(f"=== {setting} ({result['model']}) ===")
    head = f"{'scorer':<14}{'ms / batch':>20}{'x ghost':>20}{'memory MB':>12}"
    lines += ["scoring cost (one batch, compiled)", head, "-" * len(head)]
    for name, t in result["timing"].items():
      memory = "-" if t["memory_mb"] is None else f"{t['memory_mb']:.2f}"
      ms, ratio = ci_text(t["ms"], digits=2), ci_text(t["ratio_to_ghost"], digits=2)
      lines.append(f"{name:<14}{ms:>20}{ratio:>20}{memory:>12}")
    lines += claim_lines({"LAI scores faster than ghost": result["cost_claim"]}) + [""]
    for cond, c in result["conditions"].items():
      last = list(c["checkpoints"])[-1]
      lines.append(
          f"-- {setting}, {cond}: test accuracy {ci_text(c['test_accuracy'], 100, digits=1)}%, {last};"
          f" best layer set {c['best_layer_set']}; lai outer vs pairwise max rel. diff {c['outer_vs_pairwise_max']:.1e}"
      )
      head = f"{'scorer':<14}" + "".join(f"{short[m]:>15}" for m in METRICS)
      lines += [head, "-" * len(head)]
      for name, m in c["checkpoints"][last].items():
        cells = [
            ci_text(m.get(k), 100, digits=1) if k == "negative_share" else ci_text(m.get(k), digits=2) for k in METRICS
        ]
        lines.append(f"{name:<14}" + "".join(f"{cell:>15}" for cell in cells))
      def by_checkpoint(name, metric, scale, digits, c=c):
        means = (scale * point[name][metric]["mean"] for point in c["checkpoints"].values())
        return f"{name} " + " / ".join(f"{mean:.{digits}f}" for mean in means)

      trend = "  Spearman with ghost by checkpoint: " + "; ".join(
          by_checkpoint(name, "spearman_ghost", 1, 2) for name in (*LAYER_SETS, "lai-self", "contribution")
      )
      neg = "  negative share (%) by checkpoint: " + "; ".join(
          by_checkpoint(name, "negative_share", 100, 1) for name in ("ghost", *LAYER_SETS, "contribution")
      )
      lines += [trend, neg] + claim_lines(c["claims"]) + [""]
  lines.append(
      f"mean +- 95% CI over {len(summary['seeds'])} seeds. Sp/Kt: Spearman/Kendall with ghost (gh) or the exact"
      " one-step contribution (ct); top10: overlap of the top 10% with ghost's; sign=: share of samples whose"
      " sign matches; neg %: share of negative scores (samples the sign rule drops); AUROC: low score marks a"
      " flipped label (0.5 chance). Claim verdicts from the interval against the threshold shown."
  )
  return "\n".join(lines)


def claim_lines(claims: dict[str, dict]) -> list[str]:
  """One line per claim: its name, the quantity with its interval, the threshold, the verdict and the paper."""
  out = []
  for name, c in claims.items():
    side = ">" if c["direction"] == "above" else "<"
    threshold = f"{c['scale'] * c['threshold']:g}"
    out.append(
        f"  {name:<52}{c['comparison']:<36}{ci_text(c['value'], c['scale'], digits=3):>18}  ({side} {threshold})"
        f"  {c['verdict']:<26} paper: {c['paper']}"
    )
  return out


def plot(summary: dict[str, Any], path: Path) -> None:
  """Per setting: Spearman(lai, ghost) (top) and lai's negative share (bottom) over checkpoints, per noise."""
  plt = runs.pyplot()
  settings = list(summary["settings"])
  fig, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 7), squeeze=False)
  for col, setting in enumerate(settings):
    for cond, c in summary["settings"][setting]["conditions"].items():
      epochs = [int(e.split()[-1]) for e in c["checkpoints"]]
      for row, (metric, scale) in enumerate((("spearman_ghost", 1.0), ("negative_share", 100.0))):
        values = [c["checkpoints"][e]["lai"][metric] for e in c["checkpoints"]]
        mean = scale * np.array([v["mean"] for v in values])
        half = scale * np.nan_to_num(np.array([v["half_width"] for v in values]))
        axes[row, col].errorbar(epochs, mean, yerr=half, marker="o", capsize=3, label=cond)
    axes[0, col].set(title=setting, ylabel="Spearman(lai, ghost)")
    axes[1, col].set(xlabel="epoch", ylabel="lai negative share (%)")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{NAME}, {len(summary['seeds'])} seeds (95% CI)")
  runs.save_figure(fig, path)


def run_unit(
    programs: Programs, config: Config, setting: str, kind: str, level: float, seed: int, timed: bool, log
) -> dict[str, Any]:
  """One (setting, noise, seed) run: `run_seed` on its dataset, logging each checkpoint, the timings and its seconds."""
  spec = influence_common.SETTINGS[setting]
  noise_kind = "symmetric" if kind == "none" else kind
  dataset = influence_common.load(spec, seed, noise=level, kind=noise_kind, overrides=config.overrides.get(setting))
  start = time.perf_counter()
  result = run_seed(programs, dataset, config, seed, timed)
  tags = {"setting": setting, "noise": influence_common.condition_name(kind, level), "seed": seed}
  for epoch, c in result["checkpoints"].items():
    values = {f"{name}/{k}": v for name, m in c["scorers"].items() for k, v in m.items()}
    log({
        **tags, "epoch": epoch, "test_accuracy": c["test_accuracy"], "outer_vs_pairwise": c["outer_vs_pairwise"],
        **values,
    })
  if "timing" in result:
    log({**tags, **{f"timing/{name}/{k}": v for name, t in result["timing"].items() for k, v in t.items()}})
  log({**tags, "seconds": time.perf_counter() - start})
  return result


def setting_programs(config: Config, setting: str) -> Programs:
  """A setting's compiled programs, built from its clean first seed (the model depends on the data's shapes only)."""
  spec, overrides = influence_common.SETTINGS[setting], config.overrides.get(setting)
  dataset = influence_common.load(spec, config.seeds[0], noise=0.0, kind="symmetric", overrides=overrides)
  model = influence_common.model_for(spec, dataset, influence_common.hidden_for(config, setting), overrides)
  return Programs(model, train.loss_fn_for(dataset), config)


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Train every setting, noise condition and seed, scoring at each checkpoint (one unit per setting, noise and
  seed, skipped when the folder has it finished); write the run folder."""
  _, units = runs.open_run(out_dir, config)
  settings = {}
  for setting in config.settings:
    spec = influence_common.SETTINGS[setting]
    programs = setting_programs(config, setting)
    per_condition, timings = {}, []
    for index, (kind, level) in enumerate(conditions(config, setting)):
      cond = influence_common.condition_name(kind, level)
      seed_runs = [
          units.run(
              f"{setting}/{cond}/seed={seed}",
              lambda log, kind=kind, level=level, seed=seed, timed=index == 0: run_unit(
                  programs, config, setting, kind, level, seed, timed, log
              ),
          )
          for seed in config.seeds
      ]
      timings += [r["timing"] for r in seed_runs if "timing" in r]
      per_condition[cond] = summarise_condition(seed_runs, config)
    settings[setting] = {
        "model": f"{spec.model} {'-'.join(map(str, influence_common.hidden_for(config, setting)))}",
        "timing": summarise_timing(timings),
        "cost_claim": cost_claim(timings),
        "conditions": per_condition,
    }
  summary: dict[str, Any] = {"seeds": list(config.seeds), "settings": settings}
  summary["claims"] = collect_claims(settings)
  summary["table"] = format_table(summary)
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, out_dir / "influence_fidelity.png")
  return summary
