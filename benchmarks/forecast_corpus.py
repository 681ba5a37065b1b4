"""Time the forecast corpus's seed-batched training (one compiled program over all seeds, `vmap`) against
training the same seeds one after another, in one run.

    python benchmarks/forecast_corpus.py [--rounds 3] [--quick]

The corpus's setting: each dataset family of `forecast-corpus` with its default sizes (AG News and DBpedia
only when `shared/data` has them), every MLP of its grid, Adam at 1e-3, 4 seeds, `--epochs` epochs with the
per-epoch pool evaluation. Compilation is left out (one warm-up call per setting). `batched_over_sequential`
is the batched time over the sequential time (below 1: batching is faster); top-level keys are the medians
over the settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from metasel_experiments import data_file, make_model
from metasel_experiments import forecast_corpus as corpus
from pathlib import Path


def _seconds(train, rounds: int) -> float:
  train()  # compile
  times = []
  for _ in range(rounds):
    tic = time.perf_counter()
    train()
    times.append(time.perf_counter() - tic)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--quick", action="store_true", help="the quick corpus's sizes, 2 epochs, 1 round")
  args = parser.parse_args()
  config = corpus.get_config(args.quick)
  epochs, rounds = (2, 1) if args.quick else (args.epochs, args.rounds)
  results = {}
  for spec in config.datasets:
    path = data_file(spec)
    if path is not None and not Path(path).exists():
      continue
    dataset = corpus.load_family(spec, config, 0.0)
    for hidden in config.hidden:
      model = make_model("mlp", dataset, hidden)
      run = lambda seeds: corpus.train_seeds(model, dataset, 1e-3, seeds, epochs, config.batch_size)  # noqa: E731
      batched = _seconds(lambda: run(config.seeds), rounds)
      sequential = _seconds(lambda: [run((seed,)) for seed in config.seeds], rounds)
      results[f"{Path(path).parent.name if path else spec}/mlp-{'-'.join(map(str, hidden))}"] = {
          "batched_seconds": batched, "sequential_seconds": sequential, "batched_over_sequential": batched / sequential,
      }
  ratios = [r["batched_over_sequential"] for r in results.values()]
  print(json.dumps({"seeds": len(config.seeds), "epochs": epochs, "batched_over_sequential_median": statistics.median(ratios),
                    "batched_over_sequential_max": max(ratios), "settings": results}, indent=1))


if __name__ == "__main__":
  main()
