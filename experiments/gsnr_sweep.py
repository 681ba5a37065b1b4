"""GSNR sweep: how the signal-to-noise ratio of the MTS meta-gradient and of the model gradient grows with batch size.

Command:   metasel run gsnr-sweep             (the main job; about 2 minutes on a 2-core CPU)
Quick:     metasel run gsnr-sweep --quick     (under a minute, mostly compilation; used by the tests)

For each dataset and seed an MLP is warmed up with plain uniform training; then, at that point, the
GSNR (`metasel.gsnr`: per-parameter mean^2 / variance over many mini-batches, and the aggregate
||E g||^2 / E||g - E g||^2) is measured at every batch size for

* the meta-gradient: the exact hypergradient of a clean validation batch's loss through one SGD step
  on the batch, with respect to the parameters of an MTS meta-network (loss and position features,
  class and real/synthetic group embeddings);
* the model gradient: the gradient of the batch's mean loss;
* the model gradient predicted for independent samples from per-sample gradients (b times the
  per-sample GSNR, with the finite-pool correction (N - 1) / (N - b) for drawing without replacement).

Then MTS is trained at two batch sizes while the effective batch size 1 / sum p_i^2, the largest
normalised weight max p_i and Var(p_i) are recorded at every step (the MTS paper's Figure 2).

Writes config.json, metrics.jsonl, summary.json, gsnr.png and weights.png. The verdicts in the summary
(does GSNR rise with batch size; is the meta-gradient's GSNR poorer than the model gradient's) come
from the measured slopes and their 95% intervals over seeds, not from the paper.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metasel import core, data, gsnr, mts, persample, runs, stats, train
from metasel_experiments import check_model, load_checked, make_model, with_representation

NAME = "gsnr-sweep"

# Options every run of a dataset gets unless the configuration overrides them (MLPs need flat digits).
DEFAULT_OPTIONS = {"digits-synthetic": {"flatten": True}}


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of the sweep; `get_config(quick=True)` shrinks everything for tests.

  `dataset`, when set (the command line's `--dataset`), replaces `datasets` with that one dataset and
  `dataset_options` applies to it; otherwise `dataset_options` maps dataset names to their options.
  """

  datasets: tuple[str, ...] = ("mixture", "digits-synthetic")
  dataset: str | None = None
  dataset_options: dict = dataclasses.field(default_factory=dict)
  model: str = "mlp"  # "mlp", or "transformer" on text read as token ids
  hidden: tuple[int, ...] = (128, 128)
  warmup: train.TrainConfig = train.TrainConfig(epochs=3, batch_size=64, learning_rate=1e-3)
  batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
  num_batches: int = 32
  val_batch_size: int = 64
  inner_learning_rate: float = 0.1
  meta_hidden: tuple[int, ...] = (100, 100)
  trace_batch_sizes: tuple[int, ...] = (64, 256)
  trace: train.TrainConfig = train.TrainConfig(epochs=8, val_batch_size=64, learning_rate=1e-3)
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


def get_config(quick: bool = False) -> Config:
  """The default configuration; `quick` makes a seconds-long version with the same code path."""
  if not quick:
    return Config()
  small = {"n_real": 100, "n_synthetic": 200, "n_val": 64, "n_test": 100}
  return Config(
      dataset_options={"mixture": small, "digits-synthetic": {**small, "flatten": True}},
      hidden=(32,),
      warmup=train.TrainConfig(epochs=1, batch_size=32, val_batch_size=16, learning_rate=3e-3),
      batch_sizes=(8, 64),
      num_batches=4,
      val_batch_size=16,
      meta_hidden=(16,),
      trace_batch_sizes=(16, 64),
      trace=train.TrainConfig(epochs=2, val_batch_size=16, learning_rate=3e-3),
      seeds=(0, 1),
  )


def dataset_plan(config: Config) -> dict[str, dict]:
  """Dataset spec -> loader options, after the command line's single `dataset` override."""
  if config.dataset is not None:
    options = {**DEFAULT_OPTIONS.get(config.dataset, {}), **config.dataset_options}
    return {config.dataset: with_representation(config.dataset, options, config.model)}
  unknown = set(config.dataset_options) - set(config.datasets)
  if unknown:
    raise ValueError(f"dataset_options name datasets not in datasets={config.datasets}: {sorted(unknown)}")
  return {
      name: with_representation(name, {**DEFAULT_OPTIONS.get(name, {}), **config.dataset_options.get(name, {})}, config.model)
      for name in config.datasets
  }


def check(config: Config) -> None:
  """Raise a clear error for a configuration that cannot run, before any training or writing."""
  if not config.seeds:
    raise ValueError("seeds must name at least one seed, got none")
  plan = dataset_plan(config)
  if not plan:
    raise ValueError("datasets must name at least one dataset, got none")
  for name, values in (("batch_sizes", config.batch_sizes), ("trace_batch_sizes", config.trace_batch_sizes)):
    if not values or any(not isinstance(b, int) or b < 2 for b in values):
      raise ValueError(f"{name} must be integers >= 2, got {values!r}")
  if config.num_batches < 2:
    raise ValueError(f"num_batches must be at least 2 to estimate a variance, got {config.num_batches}")
  if not config.inner_learning_rate > 0:
    raise ValueError(f"inner_learning_rate must be positive, got {config.inner_learning_rate!r}")
  for spec, options in plan.items():
    dataset = load_checked(NAME, spec, options, config.seeds[0])
    check_model(config.model, dataset)
    if config.model == "mlp" and len(dataset.input_shape) != 1:
      raise ValueError(
          f"gsnr-sweep trains an MLP on flat features, but {spec!r} has samples of shape {dataset.input_shape};"
          " pass flatten=True for image datasets"
      )
    largest = max(config.batch_sizes + config.trace_batch_sizes)
    if largest > len(dataset.train):
      raise ValueError(
          f"batch size {largest} is larger than the training split of {spec!r} ({len(dataset.train)} samples);"
          " expected batch sizes at most the split size"
      )
    if config.val_batch_size > len(dataset.val):
      raise ValueError(
          f"val_batch_size={config.val_batch_size} is larger than the validation split of {spec!r}"
          f" ({len(dataset.val)} samples)"
      )
    config.warmup.check(dataset)
    for b in config.trace_batch_sizes:
      dataclasses.replace(config.trace, batch_size=b).check(dataset)


# ----------------------------------------------------------------------------------------------------
# Gradient functions, built once per dataset so that each batch size compiles once for all seeds.


class Problem:
  """The model, meta-network and gradient functions of one dataset (the same objects for every seed)."""

  def __init__(self, config: Config, dataset: data.Dataset, options: dict):
    num_classes = dataset.num_classes
    self.config = config
    self.model = make_model(config.model, dataset, config.hidden, options)
    self.loss_fn = persample.softmax_cross_entropy
    self.features = mts.concat_features(
        mts.loss_features(self.model, self.loss_fn), mts.position_features(self.model, self.loss_fn, num_classes)
    )
    self.meta_net = mts.MetaNet(config.meta_hidden, num_classes=num_classes, num_groups=2)
    self.meta_grad = functools.partial(_meta_grad, self)
    self.model_grad = functools.partial(_model_grad, self)
    self.method = mts.mts(
        self.model, self.loss_fn, self.features, meta_net=self.meta_net, inner_learning_rate=config.inner_learning_rate,
    )

  def init_meta(self, key):
    return mts.init_meta_net(self.meta_net, key, self.features.width)


def _meta_grad(problem: Problem, params, batch):
  """Hypergradient w.r.t. the meta-network of one batch. params: (model, meta, val_x, val_y)."""
  model_params, meta_params, val_x, val_y = params
  x, y, groups, key = batch
  val_rows = jax.random.choice(key, val_x.shape[0], (problem.config.val_batch_size,), replace=False)
  batch = core.Batch(jnp.zeros_like(y), x, y, groups)
  ctx = core.StepContext(model_params, batch, val_x[val_rows], val_y[val_rows], key)
  inputs = mts.meta_inputs(problem.features, problem.meta_net, ctx)
  hg = mts.batch_hypergrad(
      problem.model, problem.loss_fn, lambda phi: mts.meta_weights(problem.meta_net, phi, inputs), meta_params, ctx,
      inner_learning_rate=problem.config.inner_learning_rate,
  )
  return hg.grads


def _model_grad(problem: Problem, params, batch):
  """Gradient of the batch's mean loss w.r.t. the model."""
  x, y = batch
  return jax.grad(lambda p: jnp.mean(persample.losses(problem.model, p, x, y, problem.loss_fn)))(params)


def _draw_with_key(key, pool, batch_size):
  """Training rows without replacement plus a key for the validation rows of the same batch."""
  row_key, val_key = jax.random.split(key)
  x, y, groups = gsnr.draw_rows(row_key, pool, batch_size)
  return x, y, groups, val_key


def _iid_prediction(per_sample_aggregate: float, pool: int, batch_size: int) -> float:
  """GSNR of a b-sample mean drawn without replacement from a pool of N: b GSNR_1 (N - 1) / (N - b)."""
  if batch_size >= pool:
    return float("inf")
  return per_sample_aggregate * batch_size * (pool - 1) / (pool - batch_size)


def _loglog_slope(batch_sizes, values) -> float:
  """Least-squares slope of log(value) against log(b) over the finite, positive values."""
  b, v = np.asarray(batch_sizes, float), np.asarray(values, float)
  keep = np.isfinite(v) & (v > 0)
  if keep.sum() < 2:
    return float("nan")
  return float(np.polyfit(np.log(b[keep]), np.log(v[keep]), 1)[0])


def run_seed(config: Config, spec: str, options: dict, problem: Problem, seed: int, log) -> dict[str, Any]:
  """Warm up one seed, sweep both gradients over the batch sizes, and trace MTS's weights."""
  dataset = data.load(spec, seed=seed, **options)
  warm = train.fit(problem.model, dataset, dataclasses.replace(config.warmup, seed=seed))
  params = warm.state.params
  key = jax.random.key(seed)
  pool = (jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y), jnp.asarray(dataset.train.groups))
  val = (jnp.asarray(dataset.val.x), jnp.asarray(dataset.val.y))
  meta_params = problem.init_meta(jax.random.fold_in(key, 1))
  meta = gsnr.sweep(
      problem.meta_grad, (params, meta_params, *val), pool, config.batch_sizes,
      num_batches=config.num_batches, key=jax.random.fold_in(key, 2), draw_batch=_draw_with_key,
  )
  model = gsnr.sweep(
      problem.model_grad, params, pool[:2], config.batch_sizes,
      num_batches=config.num_batches, key=jax.random.fold_in(key, 3),
  )
  per_sample = persample.grads(problem.model, params, pool[0], pool[1], problem.loss_fn, chunk_size=256)
  per_sample_gsnr = float(gsnr.from_per_sample(per_sample, 1).aggregate)
  n = len(dataset.train)
  sweep = {
      "meta": {b: gsnr.as_dict(g) for b, g in meta.items()},
      "model": {b: gsnr.as_dict(g) for b, g in model.items()},
      "model_iid": {b: {"aggregate": _iid_prediction(per_sample_gsnr, n, b)} for b in config.batch_sizes},
  }
  for b in config.batch_sizes:
    log({"seed": seed, "dataset": spec, "batch_size": b, **{f"{k}/{s}": v for k in ("meta", "model") for s, v in sweep[k][b].items()}})
  traces = {}
  for b in config.trace_batch_sizes:
    steps = []
    trace_config = dataclasses.replace(config.trace, batch_size=b, seed=seed)
    fit = train.fit(
        problem.model, dataset, trace_config, problem.method,
        log=lambda r: steps.append(r) if "epoch" not in r else log({"seed": seed, "dataset": spec, "trace_batch_size": b, **r}),
    )
    traces[b] = {
        name: [r[f"step/{name}"] for r in steps] for name in ("effective_batch_size", "max_weight", "weight_var")
    }
    traces[b]["test_accuracy"] = fit.history[-1]["test/accuracy"]
  return {"seed": seed, "num_train": n, "sweep": sweep, "traces": traces}


# ----------------------------------------------------------------------------------------------------
# Summary, table and plots


def _window_mean(series, start: float, stop: float) -> float:
  """Mean of the part of a per-step series between two fractions of training."""
  series = np.asarray(series, float)
  lo, hi = int(start * len(series)), max(int(stop * len(series)), int(start * len(series)) + 1)
  return float(np.mean(series[lo:hi]))


def summarise_dataset(config: Config, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean and 95% interval over seeds of every GSNR, the log-log slopes, and the weight traces."""
  kinds = ("meta", "model", "model_iid")
  out: dict[str, Any] = {"num_train": per_seed[0]["num_train"], "gsnr": {}, "slope": {}, "traces": {}}
  for kind in kinds:
    out["gsnr"][kind] = {
        b: stats.mean_ci([r["sweep"][kind][b]["aggregate"] for r in per_seed])._asdict() for b in config.batch_sizes
    }
    if kind != "model_iid":
      out["gsnr"][f"{kind}_median"] = {
          b: stats.mean_ci([r["sweep"][kind][b]["median"] for r in per_seed])._asdict() for b in config.batch_sizes
      }
  finite = [b for b in config.batch_sizes if b < out["num_train"]]
  for kind in kinds:
    out["slope"][kind] = stats.mean_ci(
        [_loglog_slope(finite, [r["sweep"][kind][b]["aggregate"] for b in finite]) for r in per_seed]
    )._asdict()
  ratio = [
      np.mean([r["sweep"]["meta"][b]["aggregate"] / r["sweep"]["model"][b]["aggregate"] for b in config.batch_sizes])
      for r in per_seed
  ]
  out["meta_over_model"] = stats.mean_ci(ratio)._asdict()
  for b in config.trace_batch_sizes:
    series = [r["traces"][b] for r in per_seed]
    out["traces"][b] = {
        f"{name}_{when}": stats.mean_ci([_window_mean(s[name], *window) for s in series])._asdict()
        for name in ("effective_batch_size", "max_weight", "weight_var")
        for when, window in (("start", (0.0, 0.1)), ("end", (0.9, 1.0)))
    }
    out["traces"][b]["test_accuracy"] = stats.mean_ci([s["test_accuracy"] for s in series])._asdict()
  out["verdicts"] = verdicts(out)
  return out


def _sign(interval: dict, reference: float = 0.0) -> str:
  """"above" / "below" when the 95% interval excludes `reference`, else "unclear"."""
  lo, hi = interval["mean"] - interval["half_width"], interval["mean"] + interval["half_width"]
  if not np.isfinite(interval["half_width"]):
    return "unclear"
  return "above" if lo > reference else "below" if hi < reference else "unclear"


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
  """Plain statements read off the log-log slopes and their 95% intervals, whatever they say."""
  meta_slope, model_slope = summary["slope"]["meta"], summary["slope"]["model"]
  rises = {"above": "holds", "below": "does not hold (GSNR falls)", "unclear": "no significant trend"}
  slower = {
      "below": "yes: slower than 1 / b noise",
      "above": "no: faster than 1 / b noise",
      "unclear": "no significant difference from 1 / b noise",
  }
  as_text = lambda s: f"(log-log slope {s['mean']:.2f} +- {s['half_width']:.2f})"
  return {
      "meta-gradient GSNR rises with batch size": f"{rises[_sign(meta_slope)]} {as_text(meta_slope)}",
      "model-gradient GSNR rises with batch size": f"{rises[_sign(model_slope)]} {as_text(model_slope)}",
      "meta-gradient GSNR grows more slowly than for independent samples (slope < 1)":
          f"{slower[_sign(meta_slope, 1.0)]} {as_text(meta_slope)}",
  }


def format_table(config: Config, summaries: dict[str, dict[str, Any]]) -> str:
  """Text table: aggregate GSNR per batch size, slopes, weight diagnostics and verdicts per dataset."""
  lines = []
  for spec, s in summaries.items():
    lines.append(f"== {spec} (N = {s['num_train']} training samples, {len(config.seeds)} seeds, mean +- 95% CI)")
    lines.append(f"{'batch':>6}{'meta-gradient GSNR':>26}{'model-gradient GSNR':>26}{'iid prediction':>18}")
    for b in config.batch_sizes:
      m, g, p = (s["gsnr"][k][b] for k in ("meta", "model", "model_iid"))
      lines.append(
          f"{b:>6}{m['mean']:>15.4g} +- {m['half_width']:<7.2g}{g['mean']:>15.4g} +- {g['half_width']:<7.2g}{p['mean']:>18.4g}"
      )
    slope = s["slope"]
    lines.append(
        "log-log slope: meta {:.2f} +- {:.2f}, model {:.2f} +- {:.2f}, iid {:.2f} (batch sizes below N)".format(
            slope["meta"]["mean"], slope["meta"]["half_width"], slope["model"]["mean"], slope["model"]["half_width"],
            slope["model_iid"]["mean"],
        )
    )
    for b, t in s["traces"].items():
      lines.append(
          f"MTS at batch {b}: effective batch size {t['effective_batch_size_start']['mean']:.1f} -> "
          f"{t['effective_batch_size_end']['mean']:.1f} (+- {t['effective_batch_size_end']['half_width']:.1f}),"
          f" max p {t['max_weight_start']['mean']:.3f} -> {t['max_weight_end']['mean']:.3f},"
          f" Var(p) {t['weight_var_end']['mean']:.2e}, test accuracy {t['test_accuracy']['mean']:.3f}"
          f" +- {t['test_accuracy']['half_width']:.3f}"
      )
    for claim, verdict in s["verdicts"].items():
      lines.append(f"{claim}: {verdict}")
    lines.append("")
  return "\n".join(lines)


def plot_gsnr(config: Config, summaries: dict[str, dict[str, Any]], path: Path) -> None:
  """Log-log GSNR against batch size per dataset, with 95% bands over seeds."""
  plt = runs.pyplot()

  fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.5), squeeze=False)
  labels = {"meta": "meta-gradient (MTS)", "model": "model gradient", "model_iid": "model gradient, iid prediction"}
  for ax, (spec, s) in zip(axes[0], summaries.items()):
    b = np.asarray(config.batch_sizes, float)
    for kind, style in (("meta", "-o"), ("model", "-s"), ("model_iid", ":")):
      mean = np.array([s["gsnr"][kind][k]["mean"] for k in config.batch_sizes])
      half = np.nan_to_num([s["gsnr"][kind][k]["half_width"] for k in config.batch_sizes])
      ax.plot(b, mean, style, label=labels[kind])
      if kind != "model_iid":
        ax.fill_between(b, np.maximum(mean - half, 1e-12), mean + half, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size b")
    ax.set_ylabel("aggregate GSNR  ||E g||^2 / E||g - E g||^2")
    ax.set_title(f"{spec} (N = {s['num_train']})")
    ax.legend(fontsize=8)
  runs.save_figure(fig, path)


def plot_traces(config: Config, per_dataset: dict[str, list[dict[str, Any]]], path: Path) -> None:
  """Effective batch size, max p_i and Var(p_i) over MTS training at each traced batch size."""
  plt = runs.pyplot()

  names = ("effective_batch_size", "max_weight", "weight_var")
  fig, axes = plt.subplots(len(per_dataset), 3, figsize=(15, 3.8 * len(per_dataset)), squeeze=False)
  for row, (spec, per_seed) in zip(axes, per_dataset.items()):
    for ax, name in zip(row, names):
      for b in config.trace_batch_sizes:
        series = np.array([r["traces"][b][name] for r in per_seed])  # (seeds, steps)
        progress = np.linspace(0, 1, series.shape[1])
        ax.plot(progress, series.mean(axis=0), label=f"batch {b}")
        ax.fill_between(progress, series.min(axis=0), series.max(axis=0), alpha=0.2)
      ax.set_title(f"{spec}: {name} (mean, range over seeds)", fontsize=9)
      ax.set_xlabel("fraction of training")
      if name != "effective_batch_size":
        ax.set_yscale("log")
      ax.legend(fontsize=8)
  runs.save_figure(fig, path)


def run(config: Config, out_dir: Path) -> dict[str, Any]:
  """Run every dataset and seed (one unit each, skipped when the folder has it finished), write the run folder and
  return the summary."""
  _, units = runs.open_run(out_dir, config)
  per_dataset, summaries = {}, {}
  for spec, options in dataset_plan(config).items():
    problem = Problem(config, data.load(spec, seed=config.seeds[0], **options), options)
    per_dataset[spec] = [
        units.run(f"{spec}/seed={seed}", lambda log, seed=seed: run_seed(config, spec, options, problem, seed, log))
        for seed in config.seeds
    ]
    summaries[spec] = summarise_dataset(config, per_dataset[spec])
  summary = {"datasets": summaries, "seeds": list(config.seeds)}
  summary["table"] = format_table(config, summaries)
  runs.write_json(out_dir / "summary.json", summary)
  plot_gsnr(config, summaries, out_dir / "gsnr.png")
  plot_traces(config, per_dataset, out_dir / "weights.png")
  return summary
