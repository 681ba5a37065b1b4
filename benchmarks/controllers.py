"""Time an epoch of every controller of the controllers experiment against uniform training, in one run.

    python benchmarks/controllers.py [--rounds 3] [--epochs 4] [--quick]

The controllers experiment's setting: AG News (`shared/data/ag_news/test.csv`; the generated "mixture"
data when the file is missing), 2,000 training rows, batch 32, Adam on the cosine schedule, each arm built
as the experiment builds it (`controllers_arms.make_arm`). An epoch is one pass of N // b = 62 optimiser
steps for every arm (importance sampling presamples 3b rows per step). Its time is the time between
consecutive per-epoch log records of `train.fit` (the first epoch, with compilation, left out), the median
over `--rounds` interleaved rounds of `--epochs` epochs.

Top-level `<arm>_over_uniform` keys are the narrow MLP's (64 wide, TF-IDF), the scale where a controller's
own work weighs most against the model's; `by_scale` gives every scale's epoch seconds and ratios.
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

from metasel import data, runs, train
from metasel_experiments import controllers as experiment
from metasel_experiments import controllers_arms as arms_lib
from metasel_experiments import make_model, shared_data, with_representation
import timing

BATCH_SIZE = 32
FULL = {"n_train": 2000, "n_val": 200, "n_test": 200, "max_features": 2000, "max_length": 48, "vocab_size": 5000}
QUICK = {"n_train": 256, "n_val": 64, "n_test": 64, "max_features": 200, "max_length": 16, "vocab_size": 500}


def load(scale: arms_lib.Scale, sizes: dict) -> tuple[data.Dataset, dict, str]:
  """AG News for the scale's representation, or the generated mixture (MLP scales only) when the file is missing."""
  path = shared_data("ag_news/test.csv")
  if path.exists():
    options = with_representation(f"csv:{path}", dict(sizes), scale.model)
    return data.load(f"csv:{path}", seed=0, **options), options, "ag_news/test.csv"
  mixture = {"n_real": sizes["n_train"], "n_synthetic": 0, "n_val": sizes["n_val"], "n_test": sizes["n_test"]}
  return data.load("mixture", seed=0, **mixture), {}, f"mixture (generated: {path} not found)"


def epoch_seconds(model, dataset: data.Dataset, scale: arms_lib.Scale, arms, epochs: int, rounds: int) -> dict[str, float]:
  """Median seconds per epoch of each arm over interleaved rounds, first epochs left out."""
  settings = arms_lib.ArmSettings()
  plan = arms_lib.budget(len(dataset.train), BATCH_SIZE, epochs, epochs)  # one evaluation per pass
  pilot = np.random.default_rng(0).random(len(dataset.train))

  def fit(arm, log):
    method = arms_lib.make_arm(arm, settings, plan, BATCH_SIZE, pilot)
    config = arms_lib.train_config(arm, settings, plan, BATCH_SIZE, scale, 0)
    train.fit(model, dataset, config, method, log=log, log_every=10**9)

  return timing.epoch_seconds({arm: functools.partial(fit, arm) for arm in arms}, rounds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of training runs")
  parser.add_argument("--epochs", type=int, default=4, help="epochs (passes) per training run; the first is left out")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test of a few seconds")
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.epochs = 1, 3
  sizes = QUICK if args.quick else FULL
  scales = experiment.SCALES if not args.quick else (arms_lib.Scale("mlp-narrow", "mlp", (8,)),)
  if not shared_data("ag_news/test.csv").exists():  # generated data has no tokens for the transformer
    scales = tuple(s for s in scales if s.model != "transformer")
  by_scale = {}
  description = ""
  for scale in scales:
    dataset, options, description = load(scale, sizes)
    model = make_model(scale.model, dataset, scale.hidden, options)
    seconds = epoch_seconds(model, dataset, scale, arms_lib.ARMS, args.epochs, args.rounds)
    uniform = seconds["uniform"]
    by_scale[scale.name] = {
        "epoch_s": {arm: round(s, 5) for arm, s in seconds.items()},
        **{f"{arm}_over_uniform": round(s / uniform, 3) for arm, s in seconds.items() if arm != "uniform"},
    }
  first = by_scale[scales[0].name]
  report = {
      "dataset": description,
      "n_train": sizes["n_train"],
      "batch_size": BATCH_SIZE,
      "steps_per_epoch": sizes["n_train"] // BATCH_SIZE,
      "presample": arms_lib.ArmSettings().presample,
      "ratios_from": scales[0].name,
      **{k: v for k, v in first.items() if k.endswith("_over_uniform")},
      "max_over_uniform": max(v for k, v in first.items() if k.endswith("_over_uniform")),
      "by_scale": by_scale,
      "epochs_per_run": args.epochs,
      "rounds": args.rounds,
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
