"""Time a training step on 1, 2, 4 and 8 devices of a data mesh, in one run.

    python benchmarks/parallel.py [--rounds 3] [--epochs 4] [--quick]

Prints one JSON object: for plain (uniform) training and for MTS (the exact hypergradient through one
virtual SGD step) on the MLP 2000-128-128-4, batch 256, the median step time of `train.fit` on a data
mesh of each device count (`parallel.data_mesh(n)`; an epoch's time between consecutive log records,
its evaluation included, divided by its steps, the first epoch (compilation) left out), and each time over the one-device
mesh's as `<method>_step_over_1_device`. On a CPU the devices are forced host devices
(JAX_NUM_CPU_DEVICES, set here before JAX starts) sharing the machine's cores: the figures show that the
sharded programs run and what the partitioning costs, not a speed-up, which needs real devices.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from metasel import core, data, models, mts, parallel, persample, runs, train  # noqa: E402

INPUT_DIM, NUM_CLASSES, HIDDEN = 2000, 4, (128, 128)
DEVICE_COUNTS = (1, 2, 4, 8)


def _dataset(num_train: int, input_dim: int) -> data.Dataset:
  """Gaussian features with labels from a random linear map: a pool of `num_train` rows."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(input_dim, NUM_CLASSES)).astype(np.float32)

  def split(size):
    x = rng.normal(size=(size, input_dim)).astype(np.float32)
    return data.Split(x, np.argmax(x @ centres, axis=1).astype(np.int32), np.zeros(size, np.int32))

  names = tuple(f"f{i}" for i in range(input_dim))
  return data.Dataset("gaussian", split(num_train), split(256), split(256), NUM_CLASSES, names, ("clean",))


def step_times(model, dataset, method: core.Method, config: train.TrainConfig, mesh, rounds: int) -> float:
  """Median milliseconds per step of `train.fit` on `mesh`, first epoch of each run left out."""
  steps = len(dataset.train) // config.batch_size
  samples = []
  for _ in range(rounds):
    stamps = []
    train.fit(model, dataset, config, method, mesh=mesh, log=lambda r: stamps.append(time.perf_counter()) if "epoch" in r else None)
    samples.extend((later - earlier) / steps * 1e3 for earlier, later in zip(stamps, stamps[1:]))
  return statistics.median(samples)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of seconds")
  args = parser.parse_args()
  input_dim, num_train = (64, 512) if args.quick else (INPUT_DIM, 4096)
  if args.quick:
    args.rounds, args.epochs, args.batch = 1, 2, 64
  dataset = _dataset(num_train, input_dim)
  model = models.MLP(HIDDEN, num_outputs=NUM_CLASSES)
  loss_fn = persample.softmax_cross_entropy
  methods = {"plain": core.uniform(), "mts": mts.mts(model, loss_fn, mts.loss_features(model, loss_fn))}
  config = train.TrainConfig(
      epochs=args.epochs, batch_size=args.batch, val_batch_size=64, learning_rate=1e-3, track_dynamics=False
  )
  counts = [n for n in DEVICE_COUNTS if n <= jax.device_count()]
  times = {
      name: {n: step_times(model, dataset, method, config, parallel.data_mesh(n), args.rounds) for n in counts}
      for name, method in methods.items()
  }
  report = {
      "model": f"MLP {input_dim}-{'-'.join(map(str, HIDDEN))}-{NUM_CLASSES}",
      "batch": args.batch,
      "n_train": num_train,
      "steps_per_epoch": num_train // args.batch,
      "device_counts": counts,
      **{f"{name}_step_ms": {n: round(t, 3) for n, t in by_count.items()} for name, by_count in times.items()},
      **{
          f"{name}_step_over_1_device": {n: round(t / by_count[1], 3) for n, t in by_count.items()}
          for name, by_count in times.items()
      },
      "mts_over_plain": {n: round(times["mts"][n] / times["plain"][n], 3) for n in counts},
      "forced_host_devices": jax.default_backend() == "cpu",
      "cores": os.cpu_count(),
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
