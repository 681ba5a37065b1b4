"""Time DVN's vmapped true contributions against a per-sample loop, and a DVN epoch against uniform, in one run.

    python benchmarks/dvn.py [--rounds 5] [--epochs 6] [--quick]

Prints one JSON object for the DVN text experiment's setting: AG News (`shared/data/ag_news/test.csv`,
TF-IDF with 2000 features; the generated "mixture" data when the file is missing), 1000 training
rows, the MLP D-128-128-C, batch 32, validation batch 64, Adam at 1e-3.

* `contrib_vmap_ms`: one jitted `dvn.contributions` call for K=20 training rows against 64 validation
  rows (eta 1e-3, freshly initialised params): all K true one-step contributions at once, with the
  ghost rank-one steps; `contrib_vmap_full_grad_ms`: the same with `method="vmap"` (full per-sample
  gradients).
* `contrib_loop_ms`: the same K contributions from a Python loop over the samples, each calling a
  jitted single-sample "gradient, SGD step, validation loss", blocking at the end (what a per-sample
  loop in an eager framework does). `contrib_max_abs_diff` compares it with both vmapped results.
* `dvn_epoch_s`, `uniform_epoch_s`, `grad_norm_epoch_s`: one epoch of `train.fit` with `dvn.dvn`
  (T=10, K=20), uniform batches and `dvn.grad_norm_sampler`: the time between consecutive per-epoch
  log records, the first epoch (compilation) left out.

Contribution times are medians over interleaved rounds of the compiled functions; epoch times are
medians over `--rounds` interleaved rounds of `--epochs` epochs per method. Ratios divide times taken
in this same run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

from metasel import core, data, dvn, models, persample, runs, train
from metasel_experiments import shared_data
from timing import epoch_seconds, time_ms

AG_NEWS = "ag_news/test.csv"
HIDDEN = (128, 128)
PERIOD, NUM_SAMPLES = 10, 20
STEP_SIZE = 1e-3
BATCH_SIZE, VAL_BATCH_SIZE = 32, 64
FULL = {"n_train": 1000, "n_val": 200, "n_test": 200, "max_features": 2000}
QUICK = {"n_train": 200, "n_val": 100, "n_test": 100, "max_features": 300}


def load_dataset(sizes: dict[str, int]) -> tuple[data.Dataset, str]:
  """AG News with TF-IDF features, or the generated mixture of the same sizes when the file is missing."""
  path = shared_data(AG_NEWS)
  if path.exists():
    dataset = data.load("csv:" + str(path), seed=0, **sizes)
    return dataset, f"{AG_NEWS} (TF-IDF, {sizes['max_features']} features)"
  real = sizes["n_train"] // 5
  dataset = data.load(
      "mixture", seed=0, n_real=real, n_synthetic=sizes["n_train"] - real, n_val=sizes["n_val"], n_test=sizes["n_test"]
  )
  return dataset, f"mixture (generated: {path} not found)"


def loop_contributions(model, loss_fn, step_size: float):
  """`(params, x, y, val_x, val_y) -> (K,)`: the contributions one sample at a time, from Python."""

  def val_loss(params, val_x, val_y):
    return jnp.mean(persample.losses(model, params, val_x, val_y, loss_fn))

  def stepped_val_loss(params, x_i, y_i, val_x, val_y):
    grads = jax.grad(lambda p: persample.losses(model, p, x_i[None], y_i[None], loss_fn)[0])(params)
    stepped = jax.tree.map(lambda p, g: p - step_size * g, params, grads)
    return val_loss(stepped, val_x, val_y)

  base_fn, one_fn = jax.jit(val_loss), jax.jit(stepped_val_loss)

  def run(params, x, y, val_x, val_y):
    base = base_fn(params, val_x, val_y)
    values = [base - one_fn(params, x[i], y[i], val_x, val_y) for i in range(x.shape[0])]
    return jax.block_until_ready(jnp.stack(values))

  return run


def contribution_times(model, loss_fn, dataset: data.Dataset, rounds: int) -> dict[str, float]:
  """Median milliseconds of the K contributions: ghost vmap, full-gradient vmap and a per-sample loop."""
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  x, y = jnp.asarray(dataset.train.x[:NUM_SAMPLES]), jnp.asarray(dataset.train.y[:NUM_SAMPLES])
  val_x, val_y = jnp.asarray(dataset.val.x[:VAL_BATCH_SIZE]), jnp.asarray(dataset.val.y[:VAL_BATCH_SIZE])
  args = (params, x, y, val_x, val_y)

  def vmapped(method):
    return jax.jit(lambda p, x, y, vx, vy: dvn.contributions(model, loss_fn, p, x, y, vx, vy, STEP_SIZE, method=method))

  fns = {
      "contrib_vmap_ms": vmapped("ghost"),
      "contrib_vmap_full_grad_ms": vmapped("vmap"),
      "contrib_loop_ms": loop_contributions(model, loss_fn, STEP_SIZE),
  }
  outputs = {name: jax.block_until_ready(fn(*args)) for name, fn in fns.items()}  # compile
  # Calls per round: enough for ~50 ms of work, measured once on the compiled function.
  inner = {name: max(1, int(50 / max(time_ms(fn, args, 1), 1e-3))) for name, fn in fns.items()}
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      samples[name].append(time_ms(fn, args, inner[name]))
  result = {name: statistics.median(times) for name, times in samples.items()}
  loop = outputs["contrib_loop_ms"]
  result["contrib_max_abs_diff"] = float(
      max(jnp.max(jnp.abs(outputs[name] - loop)) for name in ("contrib_vmap_ms", "contrib_vmap_full_grad_ms"))
  )
  result["contrib_max_abs_value"] = float(jnp.max(jnp.abs(loop)))
  result["num_params"] = int(sum(leaf.size for leaf in jax.tree.leaves(params)))
  return result


def epoch_times(model, dataset: data.Dataset, methods: dict[str, core.Method], epochs: int, rounds: int):
  """Median seconds per epoch of `train.fit` for each method, over interleaved rounds, first epochs left out."""
  config = train.TrainConfig(
      epochs=epochs, batch_size=BATCH_SIZE, val_batch_size=VAL_BATCH_SIZE, optimizer="adam", learning_rate=1e-3, seed=0,
      track_dynamics=False,
  )
  fits = {name: lambda log, method=method: train.fit(model, dataset, config, method, log=log) for name, method in methods.items()}
  return epoch_seconds(fits, rounds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of training runs")
  parser.add_argument("--epochs", type=int, default=6, help="epochs per training run (the first is left out)")
  parser.add_argument("--contrib-rounds", type=int, default=7, help="interleaved rounds of contribution timings")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test of a few seconds")
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.epochs, args.contrib_rounds = 1, 3, 2
  sizes = QUICK if args.quick else FULL
  dataset, description = load_dataset(sizes)
  model = models.MLP(HIDDEN, num_outputs=dataset.num_classes)
  loss_fn = train.loss_fn_for(dataset)
  contrib = contribution_times(model, loss_fn, dataset, args.contrib_rounds)
  methods = {
      "dvn_epoch_s": dvn.dvn(model, loss_fn, period=PERIOD, num_samples=NUM_SAMPLES, step_size=STEP_SIZE),
      "uniform_epoch_s": core.uniform(),
      "grad_norm_epoch_s": dvn.grad_norm_sampler(model, loss_fn),
  }
  epochs = epoch_times(model, dataset, methods, args.epochs, args.rounds)
  uniform = epochs["uniform_epoch_s"]
  report = {
      "dataset": description,
      "n_train": len(dataset.train),
      "n_val": len(dataset.val),
      "batch_size": BATCH_SIZE,
      "val_batch_size": VAL_BATCH_SIZE,
      "K": NUM_SAMPLES,
      "T": PERIOD,
      "step_size": STEP_SIZE,
      "model": f"MLP {dataset.input_shape[0]}-{'-'.join(map(str, HIDDEN))}-{dataset.num_classes}",
      "num_params": contrib["num_params"],
      **{k: round(v, 4) for k, v in contrib.items() if k.endswith("_ms")},
      "contrib_loop_over_vmap": round(contrib["contrib_loop_ms"] / contrib["contrib_vmap_ms"], 2),
      "contrib_loop_over_vmap_full_grad": round(contrib["contrib_loop_ms"] / contrib["contrib_vmap_full_grad_ms"], 2),
      "contrib_max_abs_diff": contrib["contrib_max_abs_diff"],
      "contrib_max_abs_value": contrib["contrib_max_abs_value"],
      **{k: round(v, 4) for k, v in epochs.items()},
      "dvn_over_uniform": round(epochs["dvn_epoch_s"] / uniform, 3),
      "grad_norm_over_uniform": round(epochs["grad_norm_epoch_s"] / uniform, 3),
      "steps_per_epoch": len(dataset.train) // BATCH_SIZE,
      "epochs_per_run": args.epochs,
      "rounds": args.rounds,
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
