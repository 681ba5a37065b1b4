"""Time influence-based batch selection in the training loop against a plain step, and ghost against explicit
per-sample influence scoring, in one run.

    python benchmarks/influence.py [--rounds 7] [--only mlp,transformer] [--quick]

Prints one JSON object with a row per model, both trained by Adam at 1e-3 with validation batches of 32:

* "mlp": `models.MLP((128, 128), num_outputs=4)` on inputs of width 2000 (2000-128-128-4), batch 128;
* "transformer": `models.Transformer` (vocabulary 20,000, width 64, 2 blocks of 4 heads, 4 classes: the
  model of benchmarks/persample.py's transformer row) on 64-token sequences of 8-64 real tokens at batch
  128, so that both rows validate on a quarter of the batch.

For each row:

* `plain_step_ms`: one step of the training loop (`train.make_epoch`, a compiled `lax.scan` of
  `--steps` steps, divided by the steps) with `core.uniform()`;
* `ghost_influence_step_ms`, `lai_step_ms`: the same loop with `selection.sign_drop` of
  `influence.ghost_scorer` / `influence.lai_scorer` (all dense layers, its default "outer" form), scoring each batch
  from the step's own tape (`StepContext.tape`) against the step's validation batch;
* `greats_step_ms`: the loop with `selection.greats(influence.ghost_scorer(...), k=batch // 2,
  step_size=1e-3)` (scores and train-train interactions, then the greedy pick);
* `ghost_influence_score_ms`, `lai_score_ms`: the scorer's `scores` alone, jitted, recording its own tape
  (ghost: forward and backward to the layer outputs of both batches; LAI: forward passes only);
  `*_score_on_tape_ms`: the same given the training batch's tape recorded beforehand, as in the loop;
* `explicit_persample_ms`: the same influence from explicit per-sample gradients
  (`jax.vmap(jax.grad(...))` over the batch) dotted with the validation batch's mean gradient, jitted;
  `ghost_vs_explicit_max_rel_err` compares the two (relative to the largest score).

Ratios divide times taken in this same run: `*_over_plain` per step, and `explicit_over_ghost` =
explicit_persample_ms / ghost_influence_score_ms. Every time is the median over interleaved rounds of a
compiled function after a warm-up call. Memory (`*_memory_mb`) is the compiled program's own analysis
(temporaries plus outputs, `timing.compiled_memory`), since the CPU backend keeps no allocator statistics;
for the steps it is the whole compiled epoch's. `targets` states the hoped-for ratios; they are not checked.
The loop runs as `make_epoch` builds it by default (training-dynamics tracker on), as in benchmarks/mts.py.
`--quick` runs tiny shapes compiled with XLA's cheapest settings: a smoke test of the code paths (about half
a minute, mostly compilation), whose times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from metasel import core, influence, models, persample, runs, selection, signals, train
from timing import MODEL_SIZES, compiled_memory, time_ms

LEARNING_RATE = 1e-3
VAL_BATCH = 32
NUM_CLASSES = 4
TARGETS = {
    "lai_over_plain": "<= 1.1",
    "ghost_influence_over_plain": "<= 1.5",
    "greats_over_plain": "<= 2.0",
    "explicit_over_ghost": ">= 10 (MLP)",
}
# --quick compiles with XLA's cheapest settings: a smoke test of the code paths, whose times mean nothing,
# spends most of its time compiling 8 training loops and 10 scorers.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _init(model, key, input_shape, dtype=jnp.float32):
  """`models.init`, compiled (eager initialisation runs op by op and costs seconds)."""
  return jax.jit(lambda k: models.init(model, k, input_shape, dtype))(key)


def setups(sizes: dict, steps: dict[str, int]) -> dict:
  """name -> (description, settings, model, params, training pool (x, y), validation pool (x, y)).

  Each training pool holds exactly `steps[name]` batches; each validation pool 4 validation batches.
  """
  rng = np.random.default_rng(0)
  rows = {}
  s = sizes["mlp"]
  mlp = models.MLP(s["hidden"], num_outputs=NUM_CLASSES)
  cut = s["batch"] * steps["mlp"]
  x = jnp.asarray(rng.standard_normal((cut + 4 * VAL_BATCH, s["input_dim"]), np.float32))
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, cut + 4 * VAL_BATCH), jnp.int32)
  rows["mlp"] = (
      f"MLP {s['input_dim']}-{'-'.join(map(str, s['hidden']))}-{NUM_CLASSES}, B={s['batch']}",
      {**s, "hidden": list(s["hidden"])},
      mlp, _init(mlp, jax.random.key(1), (s["input_dim"],)), (x[:cut], y[:cut]), (x[cut:], y[cut:]),
  )
  s = sizes["transformer"]
  transformer = models.Transformer(
      vocab_size=s["vocab"], num_outputs=NUM_CLASSES, max_length=s["length"], width=s["width"], depth=s["depth"],
      heads=s["heads"],
  )
  cut = s["batch"] * steps["transformer"]
  pool = cut + 4 * VAL_BATCH
  lengths = rng.integers(s["length"] // 8, s["length"] + 1, (pool, 1))  # real tokens, the rest padding (id 0)
  ids = rng.integers(2, s["vocab"], (pool, s["length"]))
  tokens = jnp.asarray(np.where(np.arange(s["length"]) < lengths, ids, 0), jnp.int32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, pool), jnp.int32)
  rows["transformer"] = (
      (f"Transformer, vocabulary {s['vocab']}, width {s['width']}, {s['depth']} blocks x {s['heads']} heads,"
       f" {s['length']} tokens, B={s['batch']}"),
      s, transformer, _init(transformer, jax.random.key(1), (s["length"],), jnp.int32),
      (tokens[:cut], y[:cut]), (tokens[cut:], y[cut:]),
  )
  return rows


def explicit_scores(model, loss_fn):
  """`(params, x, y, val_x, val_y) -> (B,)`: <grad l_i, grad L_V> from explicit per-sample gradients."""

  def one_loss(params, x_i, y_i):
    return persample.losses(model, params, x_i[None], y_i[None], loss_fn)[0]

  def scores(params, x, y, val_x, val_y):
    val_grad = jax.grad(lambda p: jnp.mean(persample.losses(model, p, val_x, val_y, loss_fn)))(params)
    per_sample = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(params, x, y)
    dots = jax.tree.map(lambda g, v: jnp.sum(g.reshape(g.shape[0], -1) * v.reshape(-1), axis=1), per_sample, val_grad)
    return sum(jax.tree.leaves(dots))

  return scores


def _median_times(fns: dict, rounds: int, target_ms: float, per_call: dict | None = None) -> dict[str, float]:
  """Median ms per call of each compiled `(fn, args)` over interleaved rounds (divided by `per_call[name]`)."""
  per_call = per_call or {}
  inner = {name: max(1, int(target_ms / max(time_ms(fn, args, 1), 1e-3))) for name, (fn, args) in fns.items()}
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      samples[name].append(time_ms(fn, args, inner[name]) / per_call.get(name, 1))
  return {name: statistics.median(values) for name, values in samples.items()}


def bench(model, params, train_pool, val_pool, batch: int, steps: int, rounds: int, target_ms: float) -> dict:
  """Step times of the loop with each method, scoring times, their ratios and compiled memory of one row."""
  loss_fn = persample.softmax_cross_entropy
  tx = train.make_optimizer("adam", LEARNING_RATE)
  ghost = influence.ghost_scorer(model, loss_fn)
  lai = influence.lai_scorer(model, loss_fn)
  methods = {
      "plain_step": core.uniform(),
      "ghost_influence_step": selection.sign_drop(ghost),
      "lai_step": selection.sign_drop(lai),
      "greats_step": selection.greats(ghost, k=batch // 2, step_size=LEARNING_RATE),
  }
  data = (*train_pool, *val_pool)
  num_train = train_pool[1].shape[0]
  batches = jnp.arange(num_train).reshape(steps, batch)
  fns = {}
  for name, method in methods.items():
    state = train.LoopState(
        params, tx.init(params), method.init(jax.random.key(2), num_train), signals.tracker_init(num_train),
        jnp.zeros((), jnp.int32), jax.random.key(3),
    )
    fns[name] = (jax.jit(train.make_epoch(train.make_step(model, loss_fn, tx, method, num_train=num_train, track_dynamics=True), VAL_BATCH)), (state, data, batches))

  x, y = train_pool[0][:batch], train_pool[1][:batch]
  val_x, val_y = val_pool[0][:VAL_BATCH], val_pool[1][:VAL_BATCH]
  recorded = jax.jit(lambda p, x, y: persample.record(model, p, x, y, loss_fn))(params, x, y)  # the loop's tape
  args = (params, x, y, val_x, val_y)

  def on_tape(scorer):
    return jax.jit(lambda p, x, y, vx, vy, t: scorer.scores(p, x, y, vx, vy, tape=t))

  fns.update({
      "ghost_influence_score": (jax.jit(ghost.scores), args),
      "ghost_influence_score_on_tape": (on_tape(ghost), (*args, recorded)),
      "lai_score": (jax.jit(lai.scores), args),
      "lai_score_on_tape": (on_tape(lai), (*args, recorded)),
      "explicit_persample": (jax.jit(explicit_scores(model, loss_fn)), args),
  })
  outputs = {name: jax.block_until_ready(fn(*fn_args)) for name, (fn, fn_args) in fns.items()}  # compile, warm up
  times = _median_times(fns, rounds, target_ms, per_call={name: steps for name in methods})
  result = {f"{name}_ms": value for name, value in times.items()}
  plain = result["plain_step_ms"]
  for name in ("ghost_influence", "lai", "greats"):
    result[f"{name}_over_plain"] = result[f"{name}_step_ms"] / plain
  result["explicit_over_ghost"] = result["explicit_persample_ms"] / result["ghost_influence_score_ms"]
  result["explicit_over_ghost_on_tape"] = result["explicit_persample_ms"] / result["ghost_influence_score_on_tape_ms"]
  memory_of = (*methods, "ghost_influence_score", "lai_score", "explicit_persample")
  result.update({f"{name}_memory_mb": compiled_memory(*fns[name]) for name in memory_of})
  explicit = np.asarray(outputs["explicit_persample"])
  result["ghost_vs_explicit_max_rel_err"] = float(
      np.max(np.abs(np.asarray(outputs["ghost_influence_score"]) - explicit)) / np.max(np.abs(explicit))
  )
  # Share of the selecting steps' samples each rule dropped (a sanity check that selection ran).
  for name in ("ghost_influence_step", "lai_step", "greats_step"):
    result[f"{name}_mean_drop_rate"] = float(np.mean(outputs[name][1]["drop_rate"]))
  result.update(num_params=int(sum(leaf.size for leaf in jax.tree.leaves(params))), batch=batch, val_batch=VAL_BATCH)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=20, help="steps per compiled epoch, MLP row")
  parser.add_argument("--transformer-steps", type=int, default=5, help="steps per compiled epoch, Transformer row")
  parser.add_argument("--only", default="mlp,transformer", help="comma-separated rows to run")
  parser.add_argument(
      "--quick", action="store_true", help="tiny sizes and cheap compilation: a smoke test, whose times mean nothing"
  )
  args = parser.parse_args()
  if args.quick:  # before JAX starts its backend, which reads the flags once
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
  sizes, target_ms = (MODEL_SIZES["quick"], 5.0) if args.quick else (MODEL_SIZES["full"], 50.0)
  if args.quick:
    args.rounds, args.steps, args.transformer_steps = 2, 2, 2
  steps = {"mlp": args.steps, "transformer": args.transformer_steps}
  rows = {}
  models_by_name = setups(sizes, steps)
  for name in args.only.split(","):
    description, settings, model, params, train_pool, val_pool = models_by_name[name]
    rows[name] = {
        "model": description,
        "settings": {**settings, "val_batch": VAL_BATCH, "steps": steps[name], "classes": NUM_CLASSES},
        **bench(model, params, train_pool, val_pool, settings["batch"], steps[name], args.rounds, target_ms),
    }
  report = {
      **rows,
      "optimizer": f"adam, learning rate {LEARNING_RATE}",
      "greats": {"k": "batch // 2", "step_size": LEARNING_RATE},
      "lai": {"layers": "all", "form": "outer", "reference": "validation"},
      "rounds": args.rounds,
      "quick": args.quick,
      "targets": TARGETS,
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
