"""Time per-sample gradient norms and dot products against a plain batch gradient, in one run.

    python benchmarks/persample.py [--rounds 7] [--only mlp,nnx_mlp,cnn,transformer]

Prints one JSON object with a row per model, every model written with plain Flax layers (metasel tapes
them from outside):

* "mlp": a linen MLP 2000-128-128-4 of `nn.Dense` layers at batch 128;
* "nnx_mlp": the same MLP as a Flax NNX module (`nnx.Linear`), with its ghost norms over the linen row's;
* "cnn": a linen CNN conv16-conv32-dense64-10 on 28x28x1 images at batch 128;
* "transformer": `models.Transformer` (vocabulary 20,000, width 64, 2 blocks of 4 heads) on 128-token
  sequences at batch 64.

Every time is the median over interleaved rounds of the jitted, compiled function; ratios divide times
taken in this same run; trace times (building the program, before compilation) are medians over fresh
functions. Memory is the compiled program's own analysis (temporaries plus outputs), since
the CPU backend keeps no allocator statistics; on an accelerator the device's peak is reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metasel import models, persample, runs
from timing import compiled_memory, time_ms


class NNXMLP(nnx.Module):
  """The linen MLP 2000-128-128-4 as an NNX module."""

  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def bench(model, params, x, y, rounds: int, chunk_size: int | None) -> dict:
  """Median times (ms) and compiled memory (MB) of plain gradient, vmap norms, ghost norms and ghost dots."""
  loss_fn = persample.softmax_cross_entropy
  plain = jax.jit(jax.grad(lambda p, x, y: jnp.mean(persample.losses(model, p, x, y, loss_fn))))
  ref = plain(params, x, y)
  fns = {
      "plain_grad": (plain, (params, x, y)),
      "vmap_grad_norms": (
          jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn, method="vmap", chunk_size=chunk_size)),
          (params, x, y),
      ),
      "ghost_grad_norms": (jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn)), (params, x, y)),
      "ghost_dot": (
          jax.jit(lambda p, x, y, r: persample.grad_dots(model, p, x, y, r, loss_fn)), (params, x, y, ref)
      ),
      "vmap_dot": (
          jax.jit(lambda p, x, y, r: persample.grad_dots(model, p, x, y, r, loss_fn, method="vmap", chunk_size=chunk_size)),
          (params, x, y, ref),
      ),
  }
  outputs = {name: jax.block_until_ready(fn(*args)) for name, (fn, args) in fns.items()}  # compile
  inner = {name: max(1, int(50 / max(time_ms(fn, args, 1), 1e-3))) for name, (fn, args) in fns.items()}
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      samples[name].append(time_ms(fn, args, inner[name]))
  result = {f"{name}_ms": statistics.median(times) for name, times in samples.items()}
  result.update({f"{name}_memory_mb": compiled_memory(fn, args) for name, (fn, args) in fns.items()})
  plain_ms = result["plain_grad_ms"]
  for name in ("ghost_grad_norms", "ghost_dot", "vmap_grad_norms", "vmap_dot"):
    result[f"{name}_over_plain"] = result[f"{name}_ms"] / plain_ms
  result.update(trace_ms(model, params, x, y, loss_fn))
  result.update(
      ghost_vs_vmap_norm_max_rel_err=float(
          np.max(np.abs(outputs["ghost_grad_norms"] - outputs["vmap_grad_norms"]) / outputs["vmap_grad_norms"])
      ),
      ghost_vs_vmap_dot_max_rel_err=float(
          np.max(np.abs(outputs["ghost_dot"] - outputs["vmap_dot"])) / np.max(np.abs(outputs["vmap_dot"]))
      ),
      ghost_share=persample.coverage(model, params, x).ghost_share,
      num_params=int(sum(leaf.size for leaf in jax.tree.leaves(params))),
      batch=int(x.shape[0]),
      chunk_size=chunk_size,
  )
  return result


def trace_ms(model, params, x, y, loss_fn, rounds: int = 5) -> dict:
  """Median milliseconds to trace (not compile) a plain gradient and ghost norms, each time from a fresh
  function, and their ratio: what the tape, with its check that every parameter use is taped, adds."""
  fresh = {
      "plain_grad": lambda: jax.grad(lambda p, x, y: jnp.mean(persample.losses(model, p, x, y, loss_fn))),
      "ghost_grad_norms": lambda: (lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn)),
  }
  times = {name: [] for name in fresh}
  for _ in range(rounds):
    for name, make in fresh.items():
      start = time.perf_counter()
      jax.jit(make()).trace(params, x, y)
      times[name].append((time.perf_counter() - start) * 1e3)
  out = {f"{name}_trace_ms": statistics.median(values) for name, values in times.items()}
  out["ghost_grad_norms_trace_over_plain_trace"] = out["ghost_grad_norms_trace_ms"] / out["plain_grad_trace_ms"]
  return out


def setups() -> dict:
  """name -> (description, model, params, x, y) for every row."""
  keys = jax.random.split(jax.random.key(0), 8)
  mlp = models.MLP((128, 128), num_outputs=4)
  x_mlp = jax.random.normal(keys[0], (128, 2000))
  y4 = jax.random.randint(keys[1], (128,), 0, 4)
  nnx_mlp = NNXMLP((2000, 128, 128, 4), nnx.Rngs(0))
  cnn = models.CNN((16, 32), (64,), num_outputs=10)
  x_cnn = jax.random.normal(keys[2], (128, 28, 28, 1))
  y10 = jax.random.randint(keys[3], (128,), 0, 10)
  transformer = models.Transformer(vocab_size=20000, num_outputs=4, max_length=128, width=64, depth=2, heads=4)
  lengths = jax.random.randint(keys[4], (64, 1), 16, 129)
  tokens = jnp.where(jnp.arange(128) < lengths, jax.random.randint(keys[5], (64, 128), 2, 20000), 0)
  y_tokens = jax.random.randint(keys[6], (64,), 0, 4)
  return {
      "mlp": ("linen MLP 2000-128-128-4 (nn.Dense), B=128", mlp, models.init(mlp, keys[7], (2000,)), x_mlp, y4),
      "nnx_mlp": ("NNX MLP 2000-128-128-4 (nnx.Linear), B=128", nnx_mlp, models.init(nnx_mlp, keys[7], (2000,)), x_mlp, y4),
      "cnn": ("linen CNN conv16-conv32-dense64-10 on 28x28x1, B=128", cnn, models.init(cnn, keys[7], (28, 28, 1)), x_cnn, y10),
      "transformer": (
          "Transformer, vocabulary 20000, width 64, 2 blocks x 4 heads, 128 tokens, B=64", transformer,
          models.init(transformer, keys[7], (128,), jnp.int32), tokens, y_tokens,
      ),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--chunk-size", type=int, default=None, help="vmap chunk (default: whole batch)")
  parser.add_argument("--only", default="mlp,nnx_mlp,cnn,transformer", help="comma-separated rows to run")
  args = parser.parse_args()
  rows = {}
  for name, (description, model, params, x, y) in setups().items():
    if name in args.only.split(","):
      rows[name] = {"model": description, **bench(model, params, x, y, args.rounds, args.chunk_size)}
  if "mlp" in rows and "nnx_mlp" in rows:
    rows["nnx_mlp"]["ghost_norms_over_linen_ghost_norms"] = (
        rows["nnx_mlp"]["ghost_grad_norms_ms"] / rows["mlp"]["ghost_grad_norms_ms"]
    )
  print(json.dumps({**rows, **runs.environment()}, indent=2))


if __name__ == "__main__":
  main()
