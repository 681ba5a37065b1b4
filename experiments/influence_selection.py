"""Influence-based data selection under label noise: does layer-aware influence beat vanilla and ghost selection?

Command:   metasel run influence-selection           (about 16 minutes on an idle 2-core CPU, see "Time")
Quick:     metasel run influence-selection --quick   (about 20 seconds, mostly compilation; used by the tests)

Tests claim (b) of "Layer-Aware Influence for Online Data Valuation Estimation" (arXiv 2510.16007):
dropping the training samples of negative layer-aware influence (LAI) on a clean validation batch, from
the second epoch on, beats vanilla training and selection by ghost influence (first-order In-Run Data
Shapley) when labels are noisy (the paper: BERT text classification, 40% of the labels shifted
cyclically, y -> (y + 1) mod C; baselines vanilla, self-paced learning and Ghost).

Settings (`influence_common.SETTINGS`): a Gaussian mixture (MLP), synthetic digits (flattened, MLP),
AG News as TF-IDF (MLP) and AG News as token ids (transformer), 1,000 training samples each, with 20%
and 40% of the training labels flipped, cyclically (the paper's noise) and symmetrically (to another
class drawn at random); validation and test stay clean. Methods, each on the same seeds' data, initial
parameters and batch order:
  uniform         vanilla training
  random-drop     drops each sample at random with the rate lai-sign reached (the mean over seeds of its
                  drop rate in the same setting and noise): training on fewer samples, with no information
  spl             self-paced learning: keep samples whose loss is at most the median validation loss
  ghost-sign      keep samples of ghost influence >= 0 (the paper's "Ghost" baseline)
  lai-sign        keep samples of LAI >= 0, LAI summed over every dense layer (the paper's method)
  lai-last-sign   the same with the last layer only (equal to ghost influence's last-layer term)
  ghost-topk      keep the B samples of highest ghost influence of a candidate batch of 2B
  lai-topk        the same with LAI
  greats          GREATS: B of 2B picked greedily with ghost influence and its train-train
                  interactions, step size = the learning rate
  oracle          drops exactly the samples whose labels were flipped: the headroom
Every selecting method trains uniformly for the first epoch (start_step = N / B steps) and selects
from then on; the top-k and GREATS runs take those first N / B steps on their candidate batches of 2B,
so they warm up on twice as many samples per step as the others. Every run takes the same number of steps, epochs * N / B: the top-k and GREATS runs draw
candidate batches of 2B and so walk the pool in twice as many (half as long) epochs, and are evaluated
at the same steps as the others (every second of their epochs).

Reported per setting, noise and method (mean and 95% interval over seeds): test accuracy after the last
step and at the evaluation of best validation accuracy; precision and recall of the dropped sample
visits against the flipped labels and the drop rate (`selection.drop_quality`, over the selecting
steps); steps skipped for non-finite scores (nan_skips) or because nothing was kept (empty_steps);
and the median wall time of a run (the first run of a method in a setting also compiles it). Every
method's paired per-seed difference in last-step test accuracy against uniform and against ghost-sign.

Claims, per setting and on the per-seed differences averaged over the settings, at each noise: LAI
selection beats vanilla training, ghost selection and SPL; LAI beats dropping at random at its own
rate (information, not fewer samples); all layers beat the last one; LAI top-k beats ghost top-k;
the oracle beats uniform (the headroom selection has). A difference "holds" / "does not hold" when its
95% interval lies above / below 0; otherwise a two one-sided t-test (`stats.tost`, alpha 0.05) with the margin
fixed in the config (1 accuracy point) says "equivalent" or "inconclusive". Claim (b) is "supported"
at a noise when LAI beats both uniform and ghost-sign, "contradicted" when it is worse than or
equivalent to either, and "not established" otherwise. The claims are judged on last-step test
accuracy and again on the test accuracy at the best validation evaluation.

Time: the default grid (4 settings x 4 noise conditions x 10 methods x 10 seeds = 1,600 runs of 160
steps) is estimated at about 16 minutes on an otherwise idle 2-core CPU, and up to twice that when other
processes share it: one-seed probes took 70 s for the three MLP settings and 112 s for the transformer,
and each further seed adds about 20 s and 65 s. The transformer takes three quarters of it, GREATS
(ghost interactions over every token pair) a quarter of that; compilation about 2 minutes (1-2 s per
method and setting for the MLPs, 3-10 s for the transformer; the oracle's mask and random-drop's rate
live in their states, so they compile once per setting). Cut against the paper and the issue's hour: 8 epochs of batch 50
(160 steps), an MLP 2 x 128, a transformer of width 32 and depth 1 on 32 tokens (width 64 cost 1.5x for
no visible gain in a one-seed probe; width 64, depth 2 and 48 tokens about 4x).

Writes config.json, metrics.jsonl (per-epoch records of every run), summary.json and
influence_selection.png.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from metasel import core, data, runs, selection, stats, train
from metasel_experiments import ci_text, interval
from metasel_experiments import influence_common as common
from metasel_experiments.dvn_common import claim

NAME = "influence-selection"
METHODS = (
    "uniform", "random-drop", "spl", "ghost-sign", "lai-sign", "lai-last-sign", "ghost-topk", "lai-topk", "greats",
    "oracle",
)
CANDIDATE_METHODS = ("ghost-topk", "lai-topk", "greats")  # candidate batches of 2B, keep B
REFERENCES = ("uniform", "ghost-sign")  # every method's paired differences are against these
METRICS = {"last": "test accuracy after the last step", "best_val": "test accuracy at the best validation evaluation"}
PAPER = "better (claim b)"
# (claim, method, reference, what the paper says)
CLAIMS = (
    ("LAI selection beats vanilla training", "lai-sign", "uniform", PAPER),
    ("LAI selection beats ghost selection", "lai-sign", "ghost-sign", PAPER),
    ("LAI selection beats SPL", "lai-sign", "spl", PAPER),
    ("LAI beats dropping at random at its rate", "lai-sign", "random-drop", "-"),
    ("all layers beat the last layer", "lai-sign", "lai-last-sign", "-"),
    ("LAI top-k beats ghost top-k", "lai-topk", "ghost-topk", "-"),
    ("oracle beats uniform (headroom)", "oracle", "uniform", "-"),
)
ANSWER_CLAIMS = ("LAI selection beats vanilla training", "LAI selection beats ghost selection")
VERDICTS = ("holds", "does not hold", "equivalent", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the experiment; `get_config(quick=True)` shrinks everything for tests.

  `overrides` maps a setting to loader options over its own (`influence_common.SETTINGS`).
  `kind_settings` maps a noise kind to the settings it runs on (a kind not named runs on every setting).
  `batch_size` is B: the top-k and GREATS runs keep B of candidate batches of 2B. `margin` is the
  equivalence margin of the TOST, in accuracy (0.01 = 1 point), fixed before the run.
  """

  settings: tuple[str, ...] = tuple(common.SETTINGS)
  overrides: dict = dataclasses.field(default_factory=lambda: {"agnews-transformer": {"max_length": 32}})
  noise_levels: tuple[float, ...] = (0.2, 0.4)
  noise_kinds: tuple[str, ...] = ("cyclic", "symmetric")
  kind_settings: dict = dataclasses.field(default_factory=dict)
  methods: tuple[str, ...] = METHODS
  mlp_hidden: tuple[int, ...] = (128, 128)
  transformer_hidden: tuple[int, ...] = (32,)  # width 32, depth 1
  epochs: int = 8
  batch_size: int = 50
  val_batch_size: int = 64
  learning_rate: float = 1e-3
  margin: float = 0.01
  seeds: tuple[int, ...] = tuple(range(10))


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  return Config(
      settings=("mixture",),
      overrides={"mixture": {"n_real": 160, "n_val": 48, "n_test": 64, "dim": 16}},
      noise_levels=(0.4,),
      mlp_hidden=(16,),
      epochs=3,
      batch_size=16,
      val_batch_size=16,
      seeds=(0, 1),
  )


# ----------------------------------------------------------------------------------------------------
# Checks


def conditions(config: Config) -> list[tuple[str, float]]:
  """The noise conditions (kind, level), kinds first."""
  return [(kind, level) for kind in config.noise_kinds for level in config.noise_levels]


def settings_for(config: Config, kind: str) -> tuple[str, ...]:
  """The settings a noise kind runs on."""
  return tuple(config.kind_settings.get(kind, config.settings))


def _check_ints(name: str, values, minimum: int = 1) -> None:
  if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in values):
    raise ValueError(f"{name} must be integers >= {minimum}, got {values!r}")


def train_config(config: Config, method: str, seed: int) -> train.TrainConfig:
  """A method's training settings: B and `epochs`, or (top-k and GREATS) 2B and twice the epochs, the same steps."""
  factor = 2 if method in CANDIDATE_METHODS else 1
  return train.TrainConfig(
      epochs=factor * config.epochs, batch_size=factor * config.batch_size, val_batch_size=config.val_batch_size,
      optimizer="adam", learning_rate=config.learning_rate, seed=seed, track_dynamics=False,
  )


def load(config: Config, setting: str, seed: int, kind: str, level: float) -> data.Dataset:
  return common.load(common.SETTINGS[setting], seed, noise=level, kind=kind, overrides=config.overrides.get(setting))


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  _check_ints("seeds", config.seeds, minimum=0)
  if len(set(config.settings)) != len(config.settings):
    raise ValueError(f"settings {config.settings!r} name a setting twice; expected distinct names")
  if not config.noise_kinds or len(set(config.noise_kinds)) != len(config.noise_kinds):
    raise ValueError(f"noise_kinds must be distinct kinds from {common.NOISE_KINDS}, got {config.noise_kinds!r}")
  for kind in config.noise_kinds:
    common.check_settings(config.settings, kind)
  for kind, names in config.kind_settings.items():
    if kind not in config.noise_kinds:
      raise ValueError(f"kind_settings names noise kind {kind!r}, which is not among noise_kinds {config.noise_kinds!r}")
    if not names or not set(names) <= set(config.settings):
      raise ValueError(f"kind_settings[{kind!r}] = {names!r} must name some of settings {config.settings!r}")
  idle = [name for name in config.settings if not any(name in settings_for(config, k) for k in config.noise_kinds)]
  if idle:
    raise ValueError(f"settings {idle} run under no noise kind; name them in kind_settings or drop them from settings")
  unknown = [name for name in config.overrides if name not in common.SETTINGS]
  if unknown:
    raise ValueError(f"overrides name unknown settings {unknown}; expected some of {list(common.SETTINGS)}")
  levels = config.noise_levels
  if not levels or len(set(levels)) != len(levels) or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in levels):
    raise ValueError(f"noise_levels must be distinct fractions in (0, 1), got {levels!r}")
  unknown = [m for m in config.methods if m not in METHODS]
  if unknown or len(set(config.methods)) != len(config.methods):
    raise ValueError(f"methods must be distinct names from {METHODS}, got {config.methods!r}")
  if "uniform" not in config.methods:
    raise ValueError(f"methods must include 'uniform', the reference of every comparison; got {config.methods!r}")
  if "random-drop" in config.methods and "lai-sign" not in config.methods:
    raise ValueError("random-drop drops at the rate lai-sign reached, so methods must include 'lai-sign' with it")
  _check_ints("mlp_hidden", config.mlp_hidden)
  _check_ints("transformer_hidden", config.transformer_hidden)
  if config.epochs < 2 or isinstance(config.epochs, bool) or not isinstance(config.epochs, int):
    raise ValueError(f"epochs must be an integer >= 2 (selection starts after the first epoch), got {config.epochs!r}")
  if not (isinstance(config.margin, (int, float)) and 0 < config.margin < 1):
    raise ValueError(f"margin must be an accuracy difference in (0, 1), e.g. 0.01 for 1 point; got {config.margin!r}")
  _check_ints("batch_size", (config.batch_size,))
  for setting in config.settings:
    kind = next(k for k in config.noise_kinds if setting in settings_for(config, k))
    try:
      dataset = load(config, setting, config.seeds[0], kind, levels[0])
      common.model_for(common.SETTINGS[setting], dataset, common.hidden_for(config, setting), config.overrides.get(setting))
      for method in ("uniform", "ghost-topk"):
        train_config(config, method, config.seeds[0]).check(dataset)
    except ValueError as err:
      raise ValueError(f"setting {setting!r}: {err}") from None
    size, batch = len(dataset.train), config.batch_size
    if (size // (2 * batch)) * 2 != size // batch:
      raise ValueError(
          f"setting {setting!r}: batch_size={batch} splits its {size} training samples into {size // batch} steps"
          f" per epoch, and the top-k and GREATS candidate batches of {2 * batch} into {size // (2 * batch)};"
          f" expected twice as many, so that every run takes the same steps (a batch size with an even"
          f" {size} // batch_size, e.g. one dividing {size // 2})"
      )


# ----------------------------------------------------------------------------------------------------
# Methods and runs


def build_methods(config: Config, model, loss_fn, steps_per_epoch: int) -> dict[str, core.Method]:
  """Each method once per setting, so that every seed and noise reuses its compiled epoch.

  The oracle's mask and random-drop's rate depend on the seed and the noise; `selection.oracle` and
  `selection.random_drop` keep them in the method's state, so those are built at run time and still share
  one compiled epoch.
  """
  scorers = common.scorers(model, loss_fn)
  start, k = steps_per_epoch, config.batch_size
  makers = {
      "uniform": lambda: core.uniform(),
      "spl": lambda: selection.self_paced(model, loss_fn, start_step=start),
      "ghost-sign": lambda: selection.sign_drop(scorers["ghost"], start_step=start),
      "lai-sign": lambda: selection.sign_drop(scorers["lai"], start_step=start),
      "lai-last-sign": lambda: selection.sign_drop(scorers["lai-last"], start_step=start),
      "ghost-topk": lambda: selection.top_k(scorers["ghost"], k, start_step=start),
      "lai-topk": lambda: selection.top_k(scorers["lai"], k, start_step=start),
      "greats": lambda: selection.greats(scorers["ghost"], k, config.learning_rate, start_step=start),
  }
  return {name: makers[name]() for name in config.methods if name in makers}


def on_grid(history: list[dict], steps_per_epoch: int) -> list[dict]:
  """The records at the end of every B-epoch (every second candidate epoch of a top-k or GREATS run)."""
  return [r for r in history if r["step"] % steps_per_epoch == 0]


def train_run(model, dataset: data.Dataset, settings: train.TrainConfig, method: core.Method, steps_per_epoch: int) -> dict:
  """One run: its evaluations on the B-epoch grid, its drop quality against the flips, and its wall time."""
  started = time.perf_counter()
  result = train.fit(model, dataset, settings, method)
  seconds = time.perf_counter() - started
  grid = on_grid(result.history, steps_per_epoch)
  val = [r["val/accuracy"] for r in grid]
  test = [r["test/accuracy"] for r in grid]
  best = int(np.argmax(val))
  row = {
      "seed": settings.seed, "seconds": seconds, "test_accuracy": test, "val_accuracy": val, "best_epoch": best + 1,
      "last": test[-1], "best_val": test[best], "precision": None, "recall": None, "drop_rate": None,
      "nan_skips": None, "empty_steps": None,
  }
  state = result.state.method_state
  if isinstance(state, selection.SelectionState):
    row.update(selection.drop_quality(state, dataset.train.tier != data.CLEAN_TIER))
    row.update(nan_skips=int(state.nan_skips), empty_steps=int(state.empty_steps))
  return {"row": row, "history": result.history}


# ----------------------------------------------------------------------------------------------------
# Statistics


def paired_claim(comparison: str, differences, paper: str, margin: float) -> dict[str, Any]:
  """`dvn_common.claim` on paired differences (in accuracy), with a TOST and the four-way verdict.

  "holds" / "does not hold" from the 95% interval; else "equivalent" (TOST within +-margin) or "inconclusive".
  """
  out = claim(comparison, differences, paper, scale=100)
  out["interval_verdict"] = out["verdict"]
  out["equivalence"] = stats.tost(differences, margin)
  if out["verdict"] == "no significant difference":
    out["verdict"] = "equivalent" if out["equivalence"]["equivalent"] else "inconclusive"
  return out


def answer(claims: dict[str, dict]) -> str:
  """Claim (b) at one noise from its two claims: supported, contradicted, or not established."""
  verdicts = [claims[name]["verdict"] for name in ANSWER_CLAIMS if name in claims]
  if len(verdicts) < len(ANSWER_CLAIMS):
    return "not tested (needs uniform, ghost-sign and lai-sign)"
  if all(v == "holds" for v in verdicts):
    return "supported: LAI beats vanilla and ghost selection"
  if any(v in ("does not hold", "equivalent") for v in verdicts):
    parts = [f"{'vanilla' if i == 0 else 'ghost selection'}: {v}" for i, v in enumerate(verdicts)]
    return f"contradicted ({'; '.join(parts)})"
  return "not established (inconclusive)"


def method_summary(rows: list[dict]) -> dict[str, Any]:
  """Per method: 95% intervals of the accuracies, drop quality and counts over seeds, and the median run time."""
  values = lambda key: [np.nan if r[key] is None else r[key] for r in rows]
  out = {key: interval(values(key)) for key in ("last", "best_val", "best_epoch")}
  out["test_curve"] = [interval(c) for c in np.array([r["test_accuracy"] for r in rows]).T]
  if rows[0]["drop_rate"] is not None:
    out.update({key: interval(values(key)) for key in ("precision", "recall", "drop_rate", "nan_skips", "empty_steps")})
  out["seconds_median"] = float(np.median([r["seconds"] for r in rows]))
  return out


def accuracies(per_method: dict[str, list[dict]], metric: str) -> dict[str, np.ndarray]:
  return {name: np.array([r[metric] for r in rows]) for name, rows in per_method.items()}


def condition_claims(acc: dict[str, np.ndarray], margin: float) -> dict[str, dict]:
  return {
      name: paired_claim(f"{a} - {b}", acc[a] - acc[b], paper, margin)
      for name, a, b, paper in CLAIMS if a in acc and b in acc
  }


def reference_differences(acc: dict[str, np.ndarray], margin: float) -> dict[str, dict[str, dict]]:
  """Every method's paired difference against each reference present, as claims."""
  return {
      ref: {name: paired_claim(f"{name} - {ref}", a - acc[ref], "-", margin) for name, a in acc.items() if name != ref}
      for ref in REFERENCES if ref in acc
  }


# ----------------------------------------------------------------------------------------------------
# Report


def format_table(summary: dict[str, Any]) -> str:
  """Text tables: per setting and noise, every method's numbers; then the claims pooled over settings."""
  lines = []
  header = (
      f"{'method':<15}{'test acc last':>16}{'test acc @best val':>20}{'- uniform':>16}{'- ghost-sign':>16}"
      f"{'precision':>15}{'recall':>15}{'drop rate':>15}{'nan':>6}{'s/run':>7}"
  )
  for setting, per_condition in summary["settings"].items():
    for cond, result in per_condition.items():
      rate = result.get("random_drop_rate")
      lines += [f"{setting}, {cond} labels flipped" + ("" if rate is None else f" (random-drop rate {rate:.3f})"),
                header, "-" * len(header)]
      diffs = result["differences"]
      for name, m in result["methods"].items():
        vs = [diffs.get(ref, {}).get(name, {}).get("difference") for ref in REFERENCES]
        nan = m.get("nan_skips")
        lines.append(
            f"{name:<15}{ci_text(m['last'], 100):>16}{ci_text(m['best_val'], 100):>20}"
            f"{ci_text(vs[0], 100, True):>16}{ci_text(vs[1], 100, True):>16}{ci_text(m.get('precision'), digits=3):>15}"
            f"{ci_text(m.get('recall'), digits=3):>15}{ci_text(m.get('drop_rate'), digits=3):>15}"
            f"{'-' if nan is None else format(nan['mean'], '.1f'):>6}{m['seconds_median']:>7.2f}"
        )
      lines += [f"  claim (b) here, on {METRICS[metric]}: {text}" for metric, text in result["answer"].items()] + [""]
  for metric, per_condition in summary["claims"].items():
    lines.append(f"claims on {METRICS[metric]}, per-seed differences averaged over the settings (points)")
    for cond, result in per_condition.items():
      lines.append(f" {cond} ({', '.join(result['settings'])}): claim (b) {result['answer']}")
      lines += claim_lines(result["claims"])
    lines.append("")
  lines.append(
      f"mean +- 95% CI over {len(summary['seeds'])} seeds; accuracy and differences in points. Verdicts: holds /"
      f" does not hold when the 95% interval excludes 0, else equivalent (TOST, margin +-{100 * summary['margin']:g}"
      " points, alpha 0.05) or inconclusive. precision / recall: of the dropped sample visits against the flipped"
      " labels; s/run: median wall time of a run (the first also compiles). Per-setting claims are in summary.json."
  )
  return "\n".join(lines)


def claim_lines(claims: dict[str, dict]) -> list[str]:
  """One line per claim: the comparison, the difference with its 95% interval, the verdict with TOST p, the paper."""
  out = []
  for name, c in claims.items():
    p = c["equivalence"]["p"]
    out.append(
        f"  {name:<42}{c['comparison']:<28}{ci_text(c['difference'], c['scale'], True):>16}  {c['verdict']:<14}"
        f" TOST p {p:.3f}  paper: {c['paper']}"
    )
  return out


def plot(summary: dict[str, Any], path: Path) -> None:
  """Per setting: last-step test accuracy (top) and drop precision (bottom) per noise and method, 95% intervals."""
  plt = runs.pyplot()
  settings = list(summary["settings"])
  fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 7), squeeze=False)
  for col, setting in enumerate(settings):
    per_condition = summary["settings"][setting]
    conds = list(per_condition)
    names = list(next(iter(per_condition.values()))["methods"])
    width = 0.8 / len(names)
    for row, key in enumerate(("last", "precision")):
      ax = axes[row, col]
      lowest = 1.0
      for i, name in enumerate(names):
        values = [per_condition[c]["methods"][name].get(key) or {"mean": np.nan, "half_width": np.nan} for c in conds]
        means = [v["mean"] for v in values]
        lowest = min([lowest, *(m for m in means if np.isfinite(m))])
        ax.bar(np.arange(len(conds)) + i * width, means, width,
               yerr=np.nan_to_num([v["half_width"] for v in values]), label=name, capsize=2)
      ax.set_ylim(max(0.0, lowest - 0.1), 1.05)
      ax.set_xticks(np.arange(len(conds)) + 0.4 - width / 2, conds, fontsize=8)
      ax.set(title=setting if row == 0 else "", ylabel="test accuracy (last)" if row == 0 else "drop precision")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{NAME}, {len(summary['seeds'])} seeds (95% CI)")
  runs.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# The run


def run_setting(config: Config, setting: str, units) -> dict[tuple[str, float], dict[str, list[dict]]]:
  """Every method, noise and seed of one setting: per noise condition, per method, one row per seed.

  Each run is a unit (keyed `setting/method/kind=level/seed=S`, skipped when the folder has it finished).
  Methods run one at a time over every noise and seed, so each is compiled once per setting;
  random-drop runs last, at the rate lai-sign reached under each noise (read from lai-sign's rows).
  """
  conds = [c for c in conditions(config) if setting in settings_for(config, c[0])]
  datasets = {c: {seed: load(config, setting, seed, *c) for seed in config.seeds} for c in conds}
  first = datasets[conds[0]][config.seeds[0]]
  size = len(first.train)
  steps_per_epoch = size // config.batch_size
  model = common.model_for(common.SETTINGS[setting], first, common.hidden_for(config, setting), config.overrides.get(setting))
  loss_fn = train.loss_fn_for(first)
  methods = build_methods(config, model, loss_fn, steps_per_epoch)
  rows: dict[tuple[str, float], dict[str, list[dict]]] = {c: {} for c in conds}

  def run_one(name: str, cond: tuple[str, float], seed: int, method: core.Method, log) -> dict:
    dataset = datasets[cond][seed]
    result = train_run(model, dataset, train_config(config, name, seed), method, steps_per_epoch)
    tags = {"setting": setting, "noise": cond[0], "level": cond[1], "method": name, "seed": seed}
    for record in result["history"]:
      log({**tags, **record})
    return result["row"]

  def run_method(name: str, method_for) -> None:
    for cond in conds:
      rows[cond][name] = [
          units.run(
              f"{setting}/{name}/{cond[0]}={cond[1]:g}/seed={seed}",
              lambda log, cond=cond, seed=seed: run_one(name, cond, seed, method_for(cond, datasets[cond][seed]), log),
          )
          for seed in config.seeds
      ]

  for name in config.methods:
    if name == "random-drop":
      continue
    if name == "oracle":
      run_method(name, lambda cond, d: selection.oracle(d.train.tier != data.CLEAN_TIER, start_step=steps_per_epoch))
    else:
      run_method(name, lambda cond, d, m=methods[name]: m)
  if "random-drop" in config.methods:
    drop = {c: selection.random_drop(drop_rate_of(rows[c]["lai-sign"]), start_step=steps_per_epoch) for c in conds}
    run_method("random-drop", lambda cond, d: drop[cond])
  # Present the methods in the config's order.
  return {c: {name: per_method[name] for name in config.methods} for c, per_method in rows.items()}


def drop_rate_of(rows: list[dict]) -> float:
  """The mean drop rate over seeds of a selecting method's runs (0 where it never selected)."""
  rates = np.array([np.nan if r["drop_rate"] is None else r["drop_rate"] for r in rows], np.float64)
  return float(np.mean(rates[np.isfinite(rates)])) if np.isfinite(rates).any() else 0.0


def pooled_claims(config: Config, per_setting: dict, metric: str) -> dict[str, dict]:
  """Per noise condition: the claims on per-seed differences averaged over the settings that ran it."""
  out = {}
  for kind, level in conditions(config):
    names = [s for s in config.settings if (kind, level) in per_setting[s]]
    acc = {
        m: np.mean([accuracies(per_setting[s][(kind, level)], metric)[m] for s in names], axis=0)
        for m in config.methods
    }
    claims = condition_claims(acc, config.margin)
    out[common.condition_name(kind, level)] = {"settings": names, "claims": claims, "answer": answer(claims)}
  return out


def run_seconds(per_setting: dict) -> dict[str, float]:
  """Wall time of the runs (kept with each run's unit, so a resumed run reports the same), per setting and in total."""
  seconds = {}
  for setting, per_condition in per_setting.items():
    rows = [r for per_method in per_condition.values() for method_rows in per_method.values() for r in method_rows]
    seconds[setting] = float(sum(r["seconds"] for r in rows))
  return {"total": sum(seconds.values()), **seconds}


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every setting, method, noise and seed (one unit per run, skipped when the folder has it finished); write the
  run folder."""
  _, units = runs.open_run(out_dir, config)
  environment = units.run("environment", lambda log: runs.environment())  # where the run started
  per_setting = {setting: run_setting(config, setting, units) for setting in config.settings}

  settings: dict[str, dict] = {}
  for setting, per_condition in per_setting.items():
    settings[setting] = {}
    for (kind, level), per_method in per_condition.items():
      acc = accuracies(per_method, "last")
      entry = {
          "methods": {name: method_summary(rows) for name, rows in per_method.items()},
          "differences": reference_differences(acc, config.margin),
          "claims": {metric: condition_claims(accuracies(per_method, metric), config.margin) for metric in METRICS},
      }
      entry["answer"] = {metric: answer(claims) for metric, claims in entry["claims"].items()}
      if "random-drop" in per_method:
        entry["random_drop_rate"] = drop_rate_of(per_method["lai-sign"])
      settings[setting][common.condition_name(kind, level)] = entry
  summary: dict[str, Any] = {
      "seeds": list(config.seeds),
      "margin": config.margin,
      "settings": settings,
      "claims": {metric: pooled_claims(config, per_setting, metric) for metric in METRICS},
      "seconds": run_seconds(per_setting),
      "environment": environment,
      "per_seed": {
          setting: {common.condition_name(*c): rows for c, rows in per_condition.items()}
          for setting, per_condition in per_setting.items()
      },
  }
  summary["table"] = format_table(summary)
  runs.write_json(out_dir / "summary.json", summary)
  plot(summary, out_dir / "influence_selection.png")
  return summary
