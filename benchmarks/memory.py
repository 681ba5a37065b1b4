"""Peak memory of a plain training step, per-sample gradients (ghost and vmap, chunked or not) and the exact
MTS step (k unrolled steps, with and without rematerialisation), in one run.

    python benchmarks/memory.py [--only mlp,transformer] [--source auto|compiled_analysis] [--quick]

Prints one JSON object with a row per model, at the settings of benchmarks/influence.py:

* "mlp": `models.MLP((128, 128), num_outputs=4)` on inputs of width 2000, batch B = 128;
* "transformer": `models.Transformer` (vocabulary 20,000, width 64, 2 blocks of 4 heads, 4 classes) on
  64-token sequences of 8-64 real tokens, batch B = 128.

For each row, in MB:

* `plain_step_mb`: loss, gradient and an Adam update of a batch;
* `ghost_norms_mb`: `persample.grad_norms` (ghost path);
* `vmap_norms_mb`: `persample.grad_norms(method="vmap")`, each sample's gradient formed by `vmap(grad)` and
  reduced to its norm inside its chunk, unchunked and chunked (`chunk_size`);
* `vmap_grads_mb`: `persample.grads`, the per-sample gradients themselves, whose output alone is B x P
  values (`vmap_grads_output_mb`) however it is chunked;
* `by_batch`: the ghost norms, and the vmap norms and gradients unchunked and at the fixed chunk, at B and
  4B: chunked memory stays flat in B (for the gradients, their workspace beyond the B x P output), while
  unchunked memory grows with it;
* `mts_step_mb`: one training step with `mts.mts` (Meta-Weight-Net's order: k virtual SGD steps on the
  batch, the exact hypergradient of a validation batch's loss through them, a meta-network step, then
  the model's weighted Adam step) at k = 1 and k = 5, with and without `remat` (each virtual step
  rematerialised in the backward pass by `jax.checkpoint`).

`ratios` divide figures of this same run: `per_sample_vmap_over_ghost` is the unchunked vmap norms over the
ghost norms, `*_growth_4x_batch` a figure at 4B over the same at B, and `remat_saving_k*` = 1 - (with
remat) / (without): the share of the MTS step's memory remat saves, negative where it costs more.

Memory is, where the device keeps allocator statistics (GPUs), its peak while running the compiled
program, beyond the memory held before the run (its arguments), each program in a fresh process since the
peak only ever grows; the compiled program's own analysis is reported alongside (`compiled_analysis_mb`).
Elsewhere (the CPU backend keeps none) it is that analysis alone: temporaries plus outputs
(`runs.compiled_memory_mb`); nothing is run. `memory_source` says which. `--quick` compiles tiny shapes
with XLA's cheapest settings: a smoke test of the code paths, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metasel import core, models, mts, persample, runs
from timing import MODEL_SIZES

LEARNING_RATE = 1e-3
VAL_BATCH = 32
NUM_CLASSES = 4
MTS_STEPS = (1, 5)
QUICK_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)
CHUNKS = {"full": (8, 32), "quick": (2, 4)}  # chunk sizes at B; the last is the fixed chunk across batches
NOTES = [
    (
        "remat: mts.mts(remat=True) wraps each unrolled virtual step in jax.checkpoint (hypergrad.unroll), so the"
        " backward pass recomputes a step's activations instead of keeping them; the carried params of every"
        " step are still kept."
    ),
    (
        "vmap_grads output is the B x P per-sample gradients themselves; its workspace (memory beyond that"
        " output) is what chunking bounds. vmap_norms reduce each chunk's gradients to norms, so chunking"
        " bounds it all."
    ),
]


# ----------------------------------------------------------------------------------------------------
# Models and data


def _model(name: str, s: dict):
  if name == "mlp":
    return models.MLP(s["hidden"], num_outputs=NUM_CLASSES)
  return models.Transformer(
      vocab_size=s["vocab"], num_outputs=NUM_CLASSES, max_length=s["length"], width=s["width"], depth=s["depth"],
      heads=s["heads"],
  )


def _description(name: str, s: dict) -> str:
  if name == "mlp":
    return f"MLP {s['input_dim']}-{'-'.join(map(str, s['hidden']))}-{NUM_CLASSES}, B={s['batch']}"
  return (f"Transformer, vocabulary {s['vocab']}, width {s['width']}, {s['depth']} blocks x {s['heads']} heads,"
          f" {s['length']} tokens, B={s['batch']}")


def _inputs(name: str, s: dict, rows: int, rng: np.random.Generator) -> np.ndarray:
  """`rows` inputs on the host: Gaussian vectors, or token ids with 1/8 to all of each sequence real."""
  if name == "mlp":
    return rng.standard_normal((rows, s["input_dim"]), np.float32)
  lengths = rng.integers(s["length"] // 8, s["length"] + 1, (rows, 1))
  ids = rng.integers(2, s["vocab"], (rows, s["length"]))
  return np.where(np.arange(s["length"]) < lengths, ids, 0).astype(np.int32)


def _params(model, name: str, s: dict):
  """Initial params, made on the CPU so that no device allocation precedes the measured program."""
  shape, dtype = ((s["input_dim"],), jnp.float32) if name == "mlp" else ((s["length"],), jnp.int32)
  with jax.default_device(jax.devices("cpu")[0]):
    return jax.jit(lambda k: models.init(model, k, shape, dtype))(jax.random.key(1))


# ----------------------------------------------------------------------------------------------------
# The programs


def plain_step(model, loss_fn, tx):
  """`(params, opt_state, x, y) -> (params, opt_state)`: one Adam step on the batch's mean loss."""

  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: jnp.mean(persample.losses(model, p, x, y, loss_fn)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def mts_step(model, loss_fn, tx, method):
  """`(params, opt_state, meta_state, x, y, val_x, val_y) -> (...)`: the method's weights (its meta-step
  included), then the model's Adam step on the weighted loss."""

  def step(params, opt_state, meta_state, x, y, val_x, val_y):
    losses = persample.losses(model, params, x, y, loss_fn)
    batch = core.Batch(jnp.arange(y.shape[0]), x, y)
    ctx = core.StepContext(params, batch, val_x, val_y, jax.random.key(0), losses)
    weights, meta_state, _ = method.weights(meta_state, ctx)
    grads = jax.grad(lambda p: jnp.sum(weights * persample.losses(model, p, x, y, loss_fn)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, meta_state

  return step


def program_specs(chunks: tuple[int, ...], batch: int) -> dict[str, dict]:
  """Every measured program by name: what it computes, its chunk size and batch."""
  fixed = chunks[-1]
  specs = {"plain_step": {"kind": "plain_step", "batch": batch}}
  for b, tag in ((batch, "B"), (4 * batch, "4B")):
    specs[f"ghost_norms/{tag}"] = {"kind": "ghost_norms", "batch": b}
    for kind in ("vmap_norms", "vmap_grads"):
      specs[f"{kind}/unchunked/{tag}"] = {"kind": kind, "chunk": None, "batch": b}
      for chunk in chunks if tag == "B" else (fixed,):
        specs[f"{kind}/chunk_{chunk}/{tag}"] = {"kind": kind, "chunk": chunk, "batch": b}
  for k in MTS_STEPS:
    for remat in (False, True):
      program = f"mts_step/k{k}{'_remat' if remat else ''}"
      specs[program] = {"kind": "mts_step", "steps": k, "remat": remat, "batch": batch}
  return specs


def build(name: str, s: dict, spec: dict, params):
  """`(jitted fn, host arguments)` of one program on model row `name` at `params`."""
  model = _model(name, s)
  rng = np.random.default_rng(0)
  b = spec["batch"]
  x = _inputs(name, s, b, rng)
  y = rng.integers(0, NUM_CLASSES, b).astype(np.int32)
  loss_fn = persample.softmax_cross_entropy
  tx = optax.adam(LEARNING_RATE)
  kind = spec["kind"]
  if kind == "plain_step":
    return jax.jit(plain_step(model, loss_fn, tx)), (params, tx.init(params), x, y)
  if kind == "ghost_norms":
    return jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn)), (params, x, y)
  if kind == "vmap_norms":
    fn = lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn, method="vmap", chunk_size=spec["chunk"])
    return jax.jit(fn), (params, x, y)
  if kind == "vmap_grads":
    return jax.jit(lambda p, x, y: persample.grads(model, p, x, y, loss_fn, chunk_size=spec["chunk"])), (params, x, y)
  method = mts.mts(model, loss_fn, mts.loss_features(model, loss_fn), steps=spec["steps"], remat=spec["remat"])
  with jax.default_device(jax.devices("cpu")[0]):
    meta_state = method.init(jax.random.key(2), b)
  val_x, val_y = _inputs(name, s, VAL_BATCH, rng), rng.integers(0, NUM_CLASSES, VAL_BATCH).astype(np.int32)
  args = (params, tx.init(params), meta_state, x, y, val_x, val_y)
  return jax.jit(mts_step(model, loss_fn, tx, method)), args


# ----------------------------------------------------------------------------------------------------
# Measuring


def _mb(num_bytes: float) -> float:
  return num_bytes / 2**20


def output_mb(fn, args) -> float:
  """Megabytes of the program's outputs, from their shapes."""
  return _mb(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(fn, *args))))


def device_stats() -> dict | None:
  """The first device's allocator statistics, or None where it keeps none with a peak (the CPU)."""
  stats = jax.devices()[0].memory_stats()
  return stats if stats and "peak_bytes_in_use" in stats else None


def measure(name: str, s: dict, spec: dict, params, device_peak: bool) -> dict:
  """The program's compiled analysis (MB) and, with `device_peak`, its device peak (MB) beyond its arguments.

  `peak_masked` says the process's peak before the run (compilation's own scratch) was not exceeded, so
  `device_peak_mb` is an upper bound.
  """
  fn, args = build(name, s, spec, params)
  if device_peak:  # held on the device before compiling, so the program is built for it
    args = jax.block_until_ready(jax.device_put(args, jax.devices()[0]))
  compiled = fn.lower(*args).compile()
  result = {"compiled_mb": runs.compiled_memory_mb(compiled), "output_mb": output_mb(fn, args)}
  if device_peak:
    before = device_stats()
    jax.block_until_ready(compiled(*args))
    after = device_stats()
    result["device_peak_mb"] = _mb(after["peak_bytes_in_use"] - before["bytes_in_use"])
    result["peak_masked"] = after["peak_bytes_in_use"] <= before["peak_bytes_in_use"]
  return result


def measure_in_fresh_process(name: str, program: str, quick: bool) -> dict:
  """`measure` of one program in a new Python process, whose device peak starts from zero."""
  command = [sys.executable, __file__, "--measure", f"{name}:{program}"] + (["--quick"] if quick else [])
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"measuring {name}:{program} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# The report


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def _saving(without: float | None, with_remat: float | None) -> float | None:
  """Share of memory rematerialisation saves (negative where it costs more)."""
  return 1 - with_remat / without if without and with_remat is not None else None


def row(name: str, s: dict, chunks: tuple[int, ...], results: dict[str, dict], source: str, num_params: int) -> dict:
  """One model's table from its measured programs (`results[program]`), in the chosen source's figures."""
  key = "device_peak_mb" if source == "device_peak" else "compiled_mb"
  mb = {program: r[key] for program, r in results.items()}
  fixed = f"chunk_{chunks[-1]}"
  at = lambda kind, variant: {tag: mb[f"{kind}/{variant}/{tag}"] for tag in ("B", "4B")}
  workspace = lambda variant: {
      tag: mb[f"vmap_grads/{variant}/{tag}"] - results[f"vmap_grads/{variant}/{tag}"]["output_mb"]
      for tag in ("B", "4B")
  }
  variants = ("unchunked", *(f"chunk_{c}" for c in chunks))
  by_batch = {
      "batches": {"B": s["batch"], "4B": 4 * s["batch"]},
      "chunk_size": chunks[-1],
      "ghost_norms_mb": {tag: mb[f"ghost_norms/{tag}"] for tag in ("B", "4B")},
      "vmap_norms_mb": {v: at("vmap_norms", v) for v in ("unchunked", fixed)},
      "vmap_grads_mb": {v: at("vmap_grads", v) for v in ("unchunked", fixed)},
      "vmap_grads_workspace_mb": {v: workspace(v) for v in ("unchunked", fixed)},
      "vmap_grads_output_mb": {tag: results[f"vmap_grads/unchunked/{tag}"]["output_mb"] for tag in ("B", "4B")},
  }
  mts_mb = {program.split("/")[1]: value for program, value in mb.items() if program.startswith("mts_step/")}
  growth = lambda d: _ratio(d["4B"], d["B"])
  ratios = {
      "per_sample_vmap_over_ghost": _ratio(mb["vmap_norms/unchunked/B"], mb["ghost_norms/B"]),
      "vmap_grads_over_ghost": _ratio(mb["vmap_grads/unchunked/B"], mb["ghost_norms/B"]),
      "ghost_over_plain_step": _ratio(mb["ghost_norms/B"], mb["plain_step"]),
      f"vmap_norms_{fixed}_over_unchunked": _ratio(mb[f"vmap_norms/{fixed}/B"], mb["vmap_norms/unchunked/B"]),
      "ghost_norms_growth_4x_batch": growth(by_batch["ghost_norms_mb"]),
      "vmap_norms_unchunked_growth_4x_batch": growth(by_batch["vmap_norms_mb"]["unchunked"]),
      f"vmap_norms_{fixed}_growth_4x_batch": growth(by_batch["vmap_norms_mb"][fixed]),
      "vmap_grads_workspace_unchunked_growth_4x_batch": growth(by_batch["vmap_grads_workspace_mb"]["unchunked"]),
      f"vmap_grads_workspace_{fixed}_growth_4x_batch": growth(by_batch["vmap_grads_workspace_mb"][fixed]),
      **{f"mts_k{k}_over_plain_step": _ratio(mts_mb[f"k{k}"], mb["plain_step"]) for k in MTS_STEPS},
      **{f"remat_saving_k{k}": _saving(mts_mb[f"k{k}"], mts_mb[f"k{k}_remat"]) for k in MTS_STEPS},
      "mts_k5_over_k1": _ratio(mts_mb["k5"], mts_mb["k1"]),
      "mts_k5_over_k1_remat": _ratio(mts_mb["k5_remat"], mts_mb["k1_remat"]),
  }
  table = {
      "model": _description(name, s),
      "settings": {
          **{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
          "large_batch": 4 * s["batch"], "chunk_sizes": list(chunks), "val_batch": VAL_BATCH, "classes": NUM_CLASSES,
          "mts_steps": list(MTS_STEPS), "mts_inner_optimizer": "sgd, learning rate 0.1",
          "mts_meta_net": "MetaNet() 2 x 100 on the loss feature", "optimizer": f"adam, learning rate {LEARNING_RATE}",
      },
      "num_params": num_params,
      "plain_step_mb": mb["plain_step"],
      "ghost_norms_mb": mb["ghost_norms/B"],
      "vmap_norms_mb": {v: mb[f"vmap_norms/{v}/B"] for v in variants},
      "vmap_grads_mb": {v: mb[f"vmap_grads/{v}/B"] for v in variants},
      "vmap_grads_output_mb": results["vmap_grads/unchunked/B"]["output_mb"],
      "by_batch": by_batch,
      "mts_step_mb": mts_mb,
      "ratios": ratios,
  }
  if source == "device_peak":
    table["compiled_analysis_mb"] = {program: r["compiled_mb"] for program, r in results.items()}
    table["peak_masked"] = sorted(program for program, r in results.items() if r["peak_masked"])
  return table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="mlp,transformer", help="comma-separated rows to run")
  parser.add_argument(
      "--source", choices=("auto", "compiled_analysis"), default="auto",
      help="auto: the device's peak where it keeps allocator statistics, else the compiled analysis",
  )
  parser.add_argument("--quick", action="store_true", help="tiny sizes and cheap compilation: a smoke test")
  parser.add_argument("--measure", help=argparse.SUPPRESS)  # "row:program", in a fresh process
  args = parser.parse_args()
  if args.quick:  # before JAX starts its backend, which reads the flags once
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
  sizes, chunks = (MODEL_SIZES["quick"], CHUNKS["quick"]) if args.quick else (MODEL_SIZES["full"], CHUNKS["full"])
  if args.measure:
    name, program = args.measure.split(":", 1)
    s = sizes[name]
    spec = program_specs(chunks, s["batch"])[program]
    print(json.dumps(measure(name, s, spec, _params(_model(name, s), name, s), True)))
    return
  source = "device_peak" if args.source == "auto" and device_stats() is not None else "compiled_analysis"
  rows = {}
  for name in args.only.split(","):
    s = sizes[name]
    specs = program_specs(chunks, s["batch"])
    params = _params(_model(name, s), name, s)
    if source == "device_peak":
      results = {program: measure_in_fresh_process(name, program, args.quick) for program in specs}
    else:
      results = {program: measure(name, s, spec, params, False) for program, spec in specs.items()}
    num_params = int(sum(leaf.size for leaf in jax.tree.leaves(params)))
    rows[name] = row(name, s, chunks, results, source, num_params)
  notes = NOTES + [
      "device_peak: each program's device peak_bytes_in_use minus the bytes in use before its run, in a fresh"
      " process; compiled_analysis_mb gives XLA's own figure alongside." if source == "device_peak" else
      "compiled_analysis: XLA's memory analysis of each compiled program (temporaries plus outputs, not its"
      " arguments); the backend keeps no allocator statistics, so nothing is run."
  ]
  report = {**rows, "memory_source": source, "quick": args.quick, "notes": notes, **runs.environment()}
  print(json.dumps(runs.to_jsonable(report), indent=2))


if __name__ == "__main__":
  main()
