"""Time per-sample gradient norms and dot products against a plain batch gradient, in one run.

    python benchmarks/persample.py [--batch 128] [--rounds 7]

Prints one JSON object. Top-level keys describe the MLP 2000-128-128-4 at the given batch; the
"cnn" entry holds the same keys for the small CNN on 28x28x1 images (`GhostConv` layers: the
ghost path over image patches). Every time is the median over interleaved
rounds of the jitted, compiled function; ratios divide times taken in this same run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from metasel import models, persample, runs
from timing import time_ms


def bench(model, input_shape, num_classes, batch: int, rounds: int, chunk_size: int | None) -> dict:
  """Median times (ms) of plain gradient, vmap norms, ghost norms and ghost dots, and their ratios."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = models.init_params(model, keys[0], input_shape)
  x = jax.random.normal(keys[1], (batch, *input_shape))
  y = jax.random.randint(keys[2], (batch,), 0, num_classes)
  loss_fn = persample.softmax_cross_entropy

  plain = jax.jit(jax.grad(lambda p, x, y: jnp.mean(persample.losses(model, p, x, y, loss_fn))))
  ref = plain(params, x, y)
  fns = {
      "plain_grad_ms": (plain, (params, x, y)),
      "vmap_grad_norms_ms": (
          jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn, method="vmap", chunk_size=chunk_size)),
          (params, x, y),
      ),
      "ghost_grad_norms_ms": (
          jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn, chunk_size=chunk_size)),
          (params, x, y),
      ),
      "ghost_dot_ms": (
          jax.jit(lambda p, x, y, r: persample.grad_dots(model, p, x, y, r, loss_fn, chunk_size=chunk_size)),
          (params, x, y, ref),
      ),
  }
  outputs = {name: jax.block_until_ready(fn(*args)) for name, (fn, args) in fns.items()}  # compile
  # Calls per round: enough for ~50 ms of work, measured once on the compiled function.
  inner = {name: max(1, int(50 / max(time_ms(fn, args, 1), 1e-3))) for name, (fn, args) in fns.items()}
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      samples[name].append(time_ms(fn, args, inner[name]))
  result = {name: statistics.median(times) for name, times in samples.items()}
  plain_ms = result["plain_grad_ms"]
  vmap_dots = persample.grad_dots(model, params, x, y, ref, loss_fn, method="vmap", chunk_size=chunk_size)
  result.update(
      ghost_norms_over_plain=result["ghost_grad_norms_ms"] / plain_ms,
      ghost_dot_over_plain=result["ghost_dot_ms"] / plain_ms,
      vmap_norms_over_plain=result["vmap_grad_norms_ms"] / plain_ms,
      ghost_vs_vmap_norm_max_rel_err=float(
          np.max(np.abs(outputs["ghost_grad_norms_ms"] - outputs["vmap_grad_norms_ms"]) / outputs["vmap_grad_norms_ms"])
      ),
      ghost_vs_vmap_dot_max_abs_err=float(np.max(np.abs(outputs["ghost_dot_ms"] - vmap_dots))),
      num_params=int(sum(l.size for l in jax.tree.leaves(params))),
      batch=batch,
      chunk_size=chunk_size,
  )
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--chunk-size", type=int, default=None, help="vmap chunk (default: whole batch)")
  args = parser.parse_args()
  mlp = bench(models.MLP((128, 128), num_outputs=4), (2000,), 4, args.batch, args.rounds, args.chunk_size)
  cnn = bench(models.CNN((16, 32), (64,), num_outputs=10), (28, 28, 1), 10, args.batch, args.rounds, args.chunk_size)
  report = {
      "model": "MLP 2000-128-128-4",
      **mlp,
      "cnn": {"model": "CNN conv16-conv32-dense64-10 on 28x28x1", **cnn},
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
