"""Experiment `forecast-corpus`: a corpus of short training runs for learning-curve forecasting, and the forecaster
trained and validated on it.

Every configuration (dataset family x label noise x MLP width/depth x learning rate) is trained for `epochs`
evaluation periods with each of `seeds`; the seeds of one configuration run as one compiled program (`vmap`
over seeds). Each epoch logs the learning curve (validation accuracy and loss, training loss, as `train.fit`
logs them) and run-level summaries of the per-sample signals on the whole training pool
(`signals.pool_summary`: loss, EL2N and entropy quantiles, the share ever forgotten, cartography shares, the
spread of per-sample gradient norms). `metasel_experiments.forecast_report` then asks whether those
summaries add forecasting skill beyond the curve (`metasel.forecast`), and writes the forecaster that
`metasel forecast` ships.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metasel import adapters, checks, data, persample, runs, signals, train
from metasel_experiments import data_file, forecast_report, make_model, shared_data

NAME = "forecast-corpus"
AG_NEWS = f"csv:{shared_data('ag_news/test.csv')}"
DBPEDIA = f"csv:{shared_data('dbpedia_14/validation.csv')}"
TEXT_SIZES = {"n_train": 1000, "n_val": 400, "n_test": 400, "max_features": 1000}
DEFAULT_OPTIONS = {
    "mixture": {"n_real": 1000, "n_synthetic": 0, "n_val": 400, "n_test": 400, "dim": 32, "separation": 2.0},
    "digits-synthetic": {"n_real": 800, "n_synthetic": 0, "n_val": 300, "n_test": 300, "flatten": True},
    AG_NEWS: dict(TEXT_SIZES),
    DBPEDIA: dict(TEXT_SIZES),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """The corpus grid and the forecasting analysis; `get_config(quick=True)` shrinks both.

  Attributes:
    datasets: dataset specs, one family each (loaded once, with data seed `data_seed`).
    options: loader options per dataset spec.
    noises: fractions of training labels flipped (symmetric).
    hidden: MLP hidden widths, one entry per architecture.
    learning_rates: Adam step sizes.
    seeds: initialisation and batch-order seeds of every configuration, trained together.
    epochs: evaluation periods of every run (each one pass over the training pool).
    batch_size: samples per step.
    cutoffs: epochs t0 at which forecasts are made; each + `horizon` must be within `epochs`.
    horizon: the "more epochs" of the gain target.
    permutations: permutations of each permutation test with ridge (>= 500 for the reported p-values).
    boosting_permutations: permutations of the conditional test with gradient boosting (each refits every fold).
    folds: grouped cross-validation folds.
  """

  datasets: tuple[str, ...] = ("mixture", "digits-synthetic", AG_NEWS, DBPEDIA)
  options: dict = dataclasses.field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_OPTIONS.items()})
  noises: tuple[float, ...] = (0.0, 0.2, 0.4)
  hidden: tuple[tuple[int, ...], ...] = ((32,), (256,), (128, 128))
  learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
  seeds: tuple[int, ...] = (0, 1, 2, 3)
  data_seed: int = 0
  epochs: int = 40
  batch_size: int = 50
  cutoffs: tuple[int, ...] = (5, 10, 15, 20, 25, 30)
  horizon: int = 10
  permutations: int = 500
  boosting_permutations: int = 100
  folds: int = 5


def get_config(quick: bool = False) -> Config:
  if not quick:
    return Config()
  return Config(
      datasets=("mixture", "digits-synthetic"),
      options={
          "mixture": {"n_real": 200, "n_synthetic": 0, "n_val": 100, "n_test": 100, "dim": 8, "separation": 2.0},
          "digits-synthetic": {"n_real": 200, "n_synthetic": 0, "n_val": 100, "n_test": 100, "flatten": True},
      },
      noises=(0.0, 0.3), hidden=((16,),), learning_rates=(3e-3, 3e-2), seeds=(0, 1), epochs=14,
      batch_size=40, cutoffs=(4, 7), horizon=4, permutations=5, boosting_permutations=1, folds=2,
  )


def check(config: Config) -> None:
  """Refuse, before any compute, settings the corpus or its analysis cannot use."""
  if len(config.datasets) < 2 or len(set(config.datasets)) != len(config.datasets):
    raise ValueError(f"datasets must name at least two distinct dataset specs (one is held out at a time), got {config.datasets!r}")
  for spec in config.datasets:
    path = data_file(spec)
    if path is not None and not Path(path).expanduser().is_file():
      raise FileNotFoundError(f"dataset {spec!r} reads {path}, which does not exist; provide the file or drop it from datasets")
  for noise in config.noises:
    checks.check_float("noises", noise, maximum=0.9)
  if not config.hidden or any(not widths or any(not isinstance(w, int) or w < 1 for w in widths) for widths in config.hidden):
    raise ValueError(f"hidden must hold tuples of positive layer widths, got {config.hidden!r}")
  if not config.learning_rates or any(not lr > 0 for lr in config.learning_rates):
    raise ValueError(f"learning_rates must be positive, got {config.learning_rates!r}")
  if not config.seeds or len(set(config.seeds)) != len(config.seeds):
    raise ValueError(f"seeds must be distinct and at least one, got {config.seeds!r}")
  for name in ("epochs", "batch_size", "horizon", "folds"):
    checks.check_int(name, getattr(config, name), minimum=2 if name == "folds" else 1)
  checks.check_int("permutations", config.permutations)
  checks.check_int("boosting_permutations", config.boosting_permutations)
  forecast_report.check_cutoffs(config.cutoffs, config.horizon, config.epochs)
  groups = len(config.datasets) * len(config.noises) * len(config.hidden) * len(config.learning_rates)
  if groups < config.folds:
    raise ValueError(f"the grid has {groups} configurations, fewer than folds={config.folds}; grouped cross-validation needs one group per fold at least")


def load_family(spec: str, config: Config, noise: float) -> data.Dataset:
  """The dataset of one family with `noise` of its training labels flipped (the same rows for every run)."""
  dataset = data.load(spec, seed=config.data_seed, **config.options.get(spec, {}))
  return data.synthetic.label_noise(dataset, noise, seed=config.data_seed) if noise > 0 else dataset


@functools.partial(jax.jit, static_argnums=1, donate_argnums=2)
def _batched_epoch(step: train.Step, batch_size: int, state, epoch_data, batches):
  """One epoch of every seed at once (states and batches stacked over seeds; shared by every rate and noise)."""
  return jax.vmap(train.make_epoch(step, batch_size), in_axes=(0, None, 0))(state, epoch_data, batches)


def _evaluate(model, loss_fn, params, tracker, train_x, train_y, val_x, val_y):
  """One seed's pool summary and validation metrics after an epoch, and its tracker with the pool recorded."""
  logits = persample.outputs(model, params, train_x)
  losses = loss_fn(logits, train_y)
  tracker = signals.tracker_update(tracker, jnp.arange(train_y.shape[0]), losses, logits, train_y)
  norms = persample.grad_norms(model, params, train_x, train_y, loss_fn)
  summary = signals.pool_summary(tracker, losses, logits, train_y, norms)
  return tracker, {**train.evaluate(model, loss_fn, params, val_x, val_y), **summary}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batched_evaluate(model, loss_fn, params, tracker, *splits):
  return jax.vmap(functools.partial(_evaluate, model, loss_fn), in_axes=(0, 0, None, None, None, None))(params, tracker, *splits)


def train_seeds(model, dataset: data.Dataset, learning_rate: float, seeds, epochs: int, batch_size: int) -> list[list[dict]]:
  """Train `model` with Adam at `learning_rate` once per seed, all seeds in one program; each run's epoch records.

  A record holds "epoch", "val/accuracy", "val/loss", "train/mean_loss" (the mean step loss of the epoch,
  as `train.fit` logs it) and "signals/<name>" for every `signals.SUMMARY_NAMES` on the training pool.
  """
  model = adapters.as_model(model)
  loss_fn = train.loss_fn_for(dataset)
  tx = train.make_optimizer("adam", learning_rate)
  step = train.make_step(model, loss_fn, train.make_optimizer("adam"))  # one program for every rate (in the state)
  num_train = len(dataset.train)

  def initial(seed):
    init_key, loop_key, order_key = jax.random.split(jax.random.key(seed), 3)
    params = model.init(init_key, jnp.zeros((1, *dataset.input_shape), dataset.train.x.dtype))
    state = train.LoopState(params, tx.init(params), (), None, jnp.zeros((), jnp.int32), loop_key)
    return state, order_key

  adapters.init(model, jax.random.key(0), dataset.input_shape, dataset.train.x.dtype)  # a clear error for a wrong model
  state, order_keys = jax.vmap(initial)(jnp.asarray(seeds))
  tracker = jax.vmap(lambda _: signals.tracker_init(num_train))(jnp.asarray(seeds))
  splits = (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y)
  epoch_data = tuple(jnp.asarray(a) for a in splits)
  records: list[list[dict]] = [[] for _ in seeds]
  for epoch in range(epochs):
    batches = jax.vmap(lambda key: data.epoch_batches(jax.random.fold_in(key, epoch), num_train, batch_size))(order_keys)
    state, step_metrics = _batched_epoch(step, batch_size, state, epoch_data, batches)
    tracker, evaluation = _batched_evaluate(model, loss_fn, state.params, tracker, *epoch_data)
    mean_loss, evaluation = np.asarray(step_metrics["mean_loss"]).mean(axis=1), jax.device_get(evaluation)
    for i in range(len(seeds)):
      record = {"epoch": epoch + 1, "train/mean_loss": float(mean_loss[i])}
      record.update({f"val/{k}": float(evaluation[k][i]) for k in ("accuracy", "loss")})
      record.update({f"signals/{k}": float(evaluation[k][i]) for k in signals.SUMMARY_NAMES})
      records[i].append(record)
  return records


def configurations(config: Config):
  """Every (dataset, noise, hidden, learning rate) of the grid, datasets outermost."""
  return itertools.product(config.datasets, config.noises, config.hidden, config.learning_rates)


def _family(spec: str) -> str:
  """A dataset's short name: the file's folder for text ("ag_news"), else the spec."""
  path = data_file(spec)
  return Path(path).parent.name if path is not None else spec


def run(config: Config, out_dir) -> dict:
  """Train the corpus (resumable: one unit per configuration), then fit and validate the forecasters."""
  out_dir = Path(out_dir)
  _, units = runs.open_run(out_dir, config)
  corpus = []
  loaded: dict = {}
  for spec, noise, hidden, rate in configurations(config):
    tags = {"dataset": _family(spec), "noise": noise, "hidden": "-".join(map(str, hidden)), "lr": rate}
    key = "/".join(f"{k}={v}" for k, v in tags.items())

    def compute(log, spec=spec, noise=noise, hidden=hidden, rate=rate, tags=tags):
      if (spec, noise) not in loaded:
        loaded.clear()
        loaded[spec, noise] = load_family(spec, config, noise)
      dataset = loaded[spec, noise]
      model = make_model("mlp", dataset, hidden)
      tic = time.perf_counter()
      seed_records = train_seeds(model, dataset, rate, config.seeds, config.epochs, config.batch_size)
      for seed, records in zip(config.seeds, seed_records):
        for record in records:
          log({**tags, "seed": seed, **record})
      return {"tags": tags, "seeds": list(config.seeds), "records": seed_records, "seconds": time.perf_counter() - tic}

    corpus.append(units.run(key, compute))
  return forecast_report.analyse(corpus, config, out_dir, {"seconds_training": sum(u["seconds"] for u in corpus)})
