"""Time an MTS training step against a plain one, and a compiled GSNR sweep against a Python loop, in one run.

    python benchmarks/mts.py [--batch 128] [--val-batch 32] [--rounds 7]

Prints one JSON object for the MLP 2000-128-128-4 at the given batch:

* `plain_step_ms`: one step of the training loop (`train.make_epoch`) with uniform weights and Adam.
* `mts_step_ms`: the same loop with `mts.mts(..., lookahead=False)` on the loss feature: the meta-network
  weights the batch, the model takes its weighted Adam step, and the meta-network takes an AdamW step
  on the exact hypergradient of a clean validation batch's loss through that step.
* `mts_lookahead_step_ms`: Meta-Weight-Net's order (a virtual SGD step, the meta-step, then the model's
  step with the new weights): one more forward and backward pass than `mts_step_ms`.
* `gsnr_sweep_s`: `gsnr.sweep` of the MTS meta-gradient over batch sizes 16..256, `--num-batches`
  batches each (one compiled program per batch size); `gsnr_loop_s`: the same measurement with a
  Python loop over batches that runs each meta-gradient op by op (as eager frameworks do) and
  summarises on the host; `gsnr_jit_loop_s`: the same loop calling a jitted per-batch meta-gradient.

The headline validation batch is B/4 (the MTS reference code's meta batch of 256 for a batch of 1024);
`*_by_val_batch` gives the ratios at B/2 and B as well. Step times are medians of per-step means over
interleaved rounds of a compiled `lax.scan` of `--steps` steps; sweep times exclude compilation (the
compiled runners are timed on their second call, the eager loop after one warm-up batch of each
size; medians of `--sweep-rounds` interleaved rounds). `gsnr_sweep_vmap_s` and `gsnr_sweep_map_s` force
each evaluation strategy (`gsnr.evaluation_strategy`); `gsnr_sweep_s` uses the backend's choice.
`gsnr_sweep_over_jit_loop` is the compiled sweep's time over the jitted loop's. Ratios divide times
taken in this same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from metasel import core, gsnr, models, mts, persample, runs, signals, train

INPUT_DIM, NUM_CLASSES = 2000, 4
SWEEP_BATCH_SIZES = (16, 32, 64, 128, 256)


def _data(num_rows: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (num_rows, INPUT_DIM))
  y = jax.random.randint(keys[1], (num_rows,), 0, NUM_CLASSES)
  return x, y


def step_times(model, batch: int, val_batches: tuple[int, ...], steps: int, rounds: int) -> dict[str, dict[int, float]]:
  """Milliseconds per training step for uniform, online MTS and lookahead MTS at each validation batch size."""
  loss_fn = persample.softmax_cross_entropy
  tx = train.make_optimizer("adam", 1e-3)
  x, y = _data(batch * steps)
  data = (x, y, x[:512], y[:512])
  params = models.init(model, jax.random.key(1), (INPUT_DIM,))
  features = mts.loss_features(model, loss_fn)
  methods = {
      "plain_step_ms": core.uniform(),
      "mts_step_ms": mts.mts(model, loss_fn, features, lookahead=False),
      "mts_lookahead_step_ms": mts.mts(model, loss_fn, features),
  }
  batches = jnp.arange(batch * steps).reshape(steps, batch)
  programs = {}
  for val_batch in val_batches:
    for name, method in methods.items():
      state = train.LoopState(
          params, tx.init(params), method.init(jax.random.key(2), batch * steps),
          signals.tracker_init(batch * steps), jnp.zeros((), jnp.int32), jax.random.key(3),
      )
      epoch = jax.jit(train.make_epoch(train.make_step(model, loss_fn, tx, method, num_train=batch * steps, track_dynamics=True), val_batch))
      jax.block_until_ready(epoch(state, data, batches))  # compile
      programs[name, val_batch] = (epoch, state)
  samples = {key: [] for key in programs}
  for _ in range(rounds):
    for key, (epoch, state) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(epoch(state, data, batches))
      samples[key].append((time.perf_counter() - start) / steps * 1e3)
  times = {name: {} for name in methods}
  for (name, val_batch), values in samples.items():
    times[name][val_batch] = statistics.median(values)
  return times


def sweep_times(model, val_batch: int, num_batches: int, rounds: int) -> dict[str, float]:
  """Seconds for the compiled GSNR sweep of the MTS meta-gradient and for a Python loop doing the same."""
  loss_fn = persample.softmax_cross_entropy
  x, y = _data(2048, seed=4)
  val_x, val_y = _data(512, seed=5)
  params = models.init(model, jax.random.key(1), (INPUT_DIM,))
  meta_net = mts.MetaNet()
  features = mts.loss_features(model, loss_fn)
  meta_params = mts.init_meta_net(meta_net, jax.random.key(6), features.width)

  def meta_grad(params, batch):
    model_params, meta_params = params
    bx, by, vx, vy = batch
    ctx = core.StepContext(model_params, core.Batch(jnp.zeros_like(by), bx, by), vx, vy, jax.random.key(0))
    inputs = mts.meta_inputs(features, meta_net, ctx)
    weigh = lambda phi: mts.meta_weights(meta_net, phi, inputs)
    return mts.batch_hypergrad(model, loss_fn, weigh, meta_params, ctx).grads

  def draw(key, pool, batch_size):
    row_key, val_key = jax.random.split(key)
    bx, by = gsnr.draw_rows(row_key, pool, batch_size)
    vx, vy = gsnr.draw_rows(val_key, (val_x, val_y), val_batch)
    return bx, by, vx, vy

  both = (params, meta_params)
  key = jax.random.key(7)

  def compiled(strategy):
    result = gsnr.sweep(
        meta_grad, both, (x, y), SWEEP_BATCH_SIZES, num_batches=num_batches, key=key, draw_batch=draw,
        strategy=strategy,
    )
    return jax.block_until_ready(result)

  def loop(grad_fn, draw_fn):
    result = {}
    for b in SWEEP_BATCH_SIZES:
      grads = []
      for k in jax.random.split(jax.random.fold_in(key, b), num_batches):
        grads.append(grad_fn(both, draw_fn(k, (x, y), b)))
      stacked = [np.stack([np.asarray(leaf) for leaf in leaves]) for leaves in zip(*map(jax.tree.leaves, grads))]
      result[b] = gsnr.as_dict(gsnr.summarize(stacked))
    return result

  runners = {
      "gsnr_sweep_s": lambda: {b: gsnr.as_dict(g) for b, g in compiled("auto").items()},
      # Each strategy forced, whatever the backend: one vmap over the M batches, or a lax.map.
      "gsnr_sweep_vmap_s": lambda: {b: gsnr.as_dict(g) for b, g in compiled("vmap").items()},
      "gsnr_sweep_map_s": lambda: {b: gsnr.as_dict(g) for b, g in compiled("map").items()},
      # A Python loop over batches, each gradient run op by op as in eager frameworks.
      "gsnr_loop_s": lambda: loop(meta_grad, draw),
      # The same loop calling a jitted per-batch gradient: only the loop itself is left uncompiled.
      "gsnr_jit_loop_s": lambda: loop(jax.jit(meta_grad), jax.jit(draw, static_argnums=2)),
  }
  samples, results = {name: [] for name in runners}, {}
  for b in SWEEP_BATCH_SIZES:  # warm the eager loop's per-operation caches, one batch of each size
    meta_grad(both, draw(key, (x, y), b))
  for name, fn in runners.items():
    if name != "gsnr_loop_s":
      fn()  # compile
  for _ in range(rounds):  # interleaved rounds; the eager loop, by far the slowest, runs once
    for name, fn in runners.items():
      if name == "gsnr_loop_s" and samples[name]:
        continue
      start = time.perf_counter()
      results[name] = fn()
      samples[name].append(time.perf_counter() - start)
  timings = {name: statistics.median(times) for name, times in samples.items()}
  agree = max(
      abs(results["gsnr_sweep_s"][b]["aggregate"] - other[b]["aggregate"]) / abs(other[b]["aggregate"])
      for other in (results["gsnr_loop_s"], results["gsnr_jit_loop_s"], results["gsnr_sweep_vmap_s"])
      for b in SWEEP_BATCH_SIZES
  )
  return {**timings, "gsnr_sweep_vs_loops_max_rel_diff": agree}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--val-batch", type=int, default=32, help="validation batch of the headline ratio")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--num-batches", type=int, default=32)
  parser.add_argument("--sweep-rounds", type=int, default=3, help="interleaved rounds of the compiled sweeps")
  args = parser.parse_args()
  model = models.MLP((128, 128), num_outputs=NUM_CLASSES)
  val_batches = tuple(sorted({args.val_batch, args.batch // 2, args.batch}))
  steps = step_times(model, args.batch, val_batches, args.steps, args.rounds)
  sweeps = sweep_times(model, args.val_batch, args.num_batches, args.sweep_rounds)
  plain = steps["plain_step_ms"]
  ratio = lambda name, vb: round(steps[name][vb] / plain[vb], 3)
  report = {
      "model": f"MLP {INPUT_DIM}-128-128-{NUM_CLASSES}",
      "batch": args.batch,
      "val_batch": args.val_batch,
      **{name: round(times[args.val_batch], 4) for name, times in steps.items()},
      "mts_over_plain": ratio("mts_step_ms", args.val_batch),
      "mts_lookahead_over_plain": ratio("mts_lookahead_step_ms", args.val_batch),
      "mts_over_plain_by_val_batch": {vb: ratio("mts_step_ms", vb) for vb in val_batches},
      "mts_lookahead_over_plain_by_val_batch": {vb: ratio("mts_lookahead_step_ms", vb) for vb in val_batches},
      "gsnr_batch_sizes": list(SWEEP_BATCH_SIZES),
      "gsnr_num_batches": args.num_batches,
      **{k: round(v, 4) for k, v in sweeps.items()},
      "gsnr_loop_over_compiled": round(sweeps["gsnr_loop_s"] / sweeps["gsnr_sweep_s"], 2),
      "gsnr_jit_loop_over_compiled": round(sweeps["gsnr_jit_loop_s"] / sweeps["gsnr_sweep_s"], 2),
      "gsnr_sweep_over_jit_loop": round(sweeps["gsnr_sweep_s"] / sweeps["gsnr_jit_loop_s"], 3),
      "gsnr_sweep_vmap_over_jit_loop": round(sweeps["gsnr_sweep_vmap_s"] / sweeps["gsnr_jit_loop_s"], 3),
      "gsnr_sweep_map_over_jit_loop": round(sweeps["gsnr_sweep_map_s"] / sweeps["gsnr_jit_loop_s"], 3),
      "gsnr_strategy": gsnr.evaluation_strategy("auto"),
      **runs.environment(),
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
