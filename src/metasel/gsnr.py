"""Gradient signal-to-noise ratio (GSNR) of any gradient function over mini-batches.

For M gradients g_m (one per mini-batch of size b) and each parameter entry j,

    GSNR_j = mean_m(g_mj)^2 / var_m(g_mj)        (unbiased variance over the M batches, ddof=1),

and the aggregate ||E g||^2 / E||g - E g||^2 = sum_j mean_j^2 / sum_j var_j. A GSNR above 1 means the
expected step outweighs its batch-to-batch noise. For iid samples GSNR grows in proportion to b, so
comparing GSNR across batch sizes shows how much of the noise is sampling noise.

`grad_fn(params, batch) -> pytree` is any gradient: the model gradient of a batch loss, or a
meta-gradient (hypergradient with respect to meta-network parameters). Everything works under
`jax.jit`; `sweep` compiles one program per batch size that draws every batch and measures, and
reuses it for a new but equal gradient function (the same code with equal captured values).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, numerics, parallel

__all__ = [
    "GradFn",
    "DrawBatch",
    "GSNR",
    "summarize",
    "STRATEGIES",
    "evaluation_strategy",
    "measure",
    "draw_rows",
    "sweep",
    "from_per_sample",
    "as_dict",
]

Params = Any
Batch = Any
GradFn = Callable[[Params, Batch], Any]  # (params, batch) -> gradient pytree
DrawBatch = Callable[[jax.Array, Any, int], Batch]  # (key, data, batch_size) -> batch


class GSNR(NamedTuple):
  """GSNR of a gradient, per entry and summarised.

  Attributes:
    per_param: pytree like the gradient: per-entry GSNR, NaN where the variance is zero.
    mean: mean of the per-entry GSNR over entries with nonzero variance (scalar).
    median: median over the same entries (scalar).
    aggregate: ||E g||^2 / sum_j Var g_j, i.e. `signal / noise` (scalar).
    signal: ||E g||^2, the squared norm of the mean gradient (scalar).
    noise: sum_j Var g_j, the expected squared distance of a gradient from its mean (scalar).
    num_batches: number of gradients the estimate uses (M, or n for `from_per_sample`).
  """

  per_param: Any
  mean: jax.Array
  median: jax.Array
  aggregate: jax.Array
  signal: jax.Array
  noise: jax.Array
  num_batches: int | jax.Array


def _leading_size(tree, what: str) -> int:
  """The common leading axis of every leaf of `tree`; raise when there is none or they disagree."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{what} has no array leaves; expected a pytree of arrays with a leading axis")
  shapes = [jnp.shape(leaf) for leaf in leaves]
  if any(len(shape) == 0 for shape in shapes):
    raise ValueError(f"{what} has a scalar leaf; every leaf needs a leading axis, got shapes {shapes}")
  sizes = {shape[0] for shape in shapes}
  if len(sizes) != 1:
    raise ValueError(f"{what} leaves disagree on the leading axis: got sizes {sorted(sizes)}, expected one")
  return sizes.pop()


def _as_float(leaf) -> jax.Array:
  leaf = jnp.asarray(leaf)
  return leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))


def _from_moments(means, variances, num_batches) -> GSNR:
  """`GSNR` from per-entry means and variances (pytrees of equal structure, no leading axis)."""

  per_param = jax.tree.map(lambda m, v: numerics.safe_divide(jnp.square(m), v, jnp.nan), means, variances)
  flat = jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(per_param)])  # (P,)
  signal = sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(means))
  noise = sum(jnp.sum(v) for v in jax.tree.leaves(variances))
  return GSNR(
      per_param=per_param,
      mean=jnp.nanmean(flat),
      median=jnp.nanmedian(flat),
      aggregate=signal / noise,
      signal=signal,
      noise=noise,
      num_batches=num_batches,
  )


def _moments(stacked):
  """Per-entry mean and unbiased (ddof=1) variance over the leading axis of every leaf."""
  stacked = jax.tree.map(_as_float, stacked)
  means = jax.tree.map(lambda g: jnp.mean(g, axis=0), stacked)
  variances = jax.tree.map(lambda g: jnp.var(g, axis=0, ddof=1), stacked)
  return means, variances


def summarize(stacked_grads) -> GSNR:
  """GSNR of M gradients stacked on the leading axis of every leaf (shapes (M, ...)), M >= 2.

  Per entry mean^2 / var with the unbiased variance (ddof=1); entries of zero variance get NaN and
  drop out of `mean` and `median`.
  """
  num = _leading_size(stacked_grads, "stacked_grads")
  if num < 2:
    raise ValueError(f"summarize needs at least 2 gradients on the leading axis for a variance, got {num}")
  means, variances = _moments(stacked_grads)
  return _from_moments(means, variances, num)


STRATEGIES = ("auto", "vmap", "map")


def evaluation_strategy(strategy: str = "auto", backend: str | None = None) -> str:
  """The way M gradients are evaluated: "vmap" (one batched program) or "map" (`lax.map`, in chunks).

  "auto" picks "vmap" on accelerators, where batching the M backward passes fills the device, and "map"
  on the CPU, where XLA runs batched matrix products slower than the same products one after another.
  """
  checks.check_choice("strategy", strategy, STRATEGIES)
  if strategy != "auto":
    return strategy
  return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"


def _stacked_grads(grad_of: Callable[[Any], Any], items, strategy: str, chunk_size: int | None):
  """`grad_of(item)` for the M items stacked on axis 0 of `items` (leaves (M, ...) out), by `strategy`: one
  vmap, or `lax.map` over chunks of `chunk_size` (default 1)."""
  num = _leading_size(items, "batches")
  if strategy == "vmap" and (chunk_size is None or chunk_size >= num):
    return jax.vmap(grad_of)(items)
  return jax.lax.map(grad_of, items, batch_size=chunk_size)


def _spread_over_devices(grad_of: Callable[[Any], Any], items, strategy: str, chunk_size: int | None):
  """`_stacked_grads` with the M items split over the ambient data mesh, each device evaluating its share."""
  devices = parallel.mesh_size()
  if devices == 1:
    return _stacked_grads(grad_of, items, strategy, chunk_size)
  num = _leading_size(items, "batches")
  parallel.check_divides(num, devices, "num_batches")
  shares = parallel.constrain_rows(jax.tree.map(lambda b: b.reshape(devices, num // devices, *b.shape[1:]), items))
  stacked = jax.vmap(lambda share: _stacked_grads(grad_of, share, strategy, chunk_size))(shares)
  return jax.tree.map(lambda g: g.reshape(num, *g.shape[2:]), stacked)


def measure(
    grad_fn: GradFn, params: Params, batches, *, chunk_size: int | None = None, strategy: str = "auto"
) -> GSNR:
  """GSNR of `grad_fn(params, batch)` over M batches stacked on the leading axis of `batches`' leaves.

  The M gradients come from one `jax.vmap` (`strategy="vmap"`), or from `jax.lax.map` over chunks of
  `chunk_size` batches (`strategy="map"`, or any `chunk_size` below M), which bounds the memory of the
  backward passes (the M stacked gradients still exist); "auto" chooses by backend
  (`evaluation_strategy`). Under a data mesh the M batches are split over its devices (M must divide
  over them). Not jitted here: jit the caller.
  """
  num = _leading_size(batches, "batches")
  if num < 2:
    raise ValueError(f"measure needs at least 2 batches on the leading axis of batches, got {num}")
  checks.check_int("chunk_size", chunk_size, allow_none=True)
  stacked = _spread_over_devices(lambda batch: grad_fn(params, batch), batches, evaluation_strategy(strategy), chunk_size)
  return summarize(stacked)


def draw_rows(key: jax.Array, data, batch_size: int):
  """`batch_size` rows drawn uniformly without replacement from `data` (leaves share axis 0).

  The same rows are taken from every leaf. The rows are the top `batch_size` of n iid uniform keys:
  a uniform random subset in random order, which on CPU costs a fraction of a full permutation.
  """
  num_rows = _leading_size(data, "data")
  checks.check_int("batch_size", batch_size)
  if batch_size > num_rows:
    raise ValueError(
        f"batch_size {batch_size} exceeds the pool of {num_rows} rows; cannot draw without replacement"
    )
  _, rows = jax.lax.top_k(jax.random.uniform(key, (num_rows,)), batch_size)  # (b,)
  return jax.tree.map(lambda leaf: jnp.take(leaf, rows, axis=0), data)


@functools.partial(
    jax.jit, static_argnames=("grad_fn", "batch_size", "num_batches", "draw_batch", "chunk_size", "strategy")
)
def _measure_drawn(grad_fn, params, data, key, *, batch_size, num_batches, draw_batch, chunk_size, strategy) -> GSNR:
  """Draw `num_batches` batches of `batch_size` with `draw_batch` and measure: one compiled program.

  `grad_fn` and `draw_batch` are static: equal ones (the same function, or equal records) share the program.
  """
  keys = jax.random.split(jax.random.fold_in(key, batch_size), num_batches)
  # Each batch is drawn where its gradient is taken: a mapped strategy never holds all M batches at once.
  stacked = _spread_over_devices(
      lambda k: grad_fn(params, draw_batch(k, data, batch_size)), keys, strategy, chunk_size
  )
  return summarize(stacked)


def _pool_size(data) -> int:
  """Rows available in `data`: the smallest leading axis of its leaves."""
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("data has no array leaves; expected a pytree of arrays with a leading row axis")
  shapes = [jnp.shape(leaf) for leaf in leaves]
  if any(len(shape) == 0 for shape in shapes):
    raise ValueError(f"data has a scalar leaf; every leaf needs a leading row axis, got shapes {shapes}")
  return min(shape[0] for shape in shapes)


def sweep(
    grad_fn: GradFn,
    params: Params,
    data,
    batch_sizes: Sequence[int],
    *,
    num_batches: int,
    key: jax.Array,
    draw_batch: DrawBatch = draw_rows,
    chunk_size: int | None = None,
    strategy: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[int, GSNR]:
  """GSNR of `grad_fn` at each batch size b, over `num_batches` batches drawn from `data`.

  Each b runs one jitted program, compiled once per (b, num_batches, grad_fn, draw_batch,
  chunk_size): it splits `jax.random.fold_in(key, b)` into `num_batches` keys, draws every batch with
  `jax.vmap` of `draw_batch(key, data, b)` and calls `measure`. All arguments are checked first.
  Functions compare as `jax.jit`'s static arguments do: the same function object reuses its program,
  and so does a record equal by value (a `metasel.records.Recipe` of equal settings); a new closure
  compiles its own.

  `strategy` chooses how the M gradients are evaluated (`evaluation_strategy`: by default a `lax.map` on
  the CPU, one `vmap` on accelerators). With a data `mesh` (default: the one set with `jax.set_mesh`,
  if any) the M batches are split over its devices; M must divide over them.

  Returns:
    dict b -> `GSNR`, with `num_batches` a Python int.
  """
  batch_sizes = tuple(batch_sizes)
  pool = _pool_size(data)
  checks.check_int("num_batches", num_batches, minimum=2)
  checks.check_int("chunk_size", chunk_size, allow_none=True)
  strategy = evaluation_strategy(strategy)
  mesh = parallel.resolve_mesh(mesh)
  if mesh is not None:
    parallel.check_divides(num_batches, parallel.mesh_size(mesh), "num_batches")
  for b in batch_sizes:
    if not checks.is_int(b) or b < 1:
      raise ValueError(f"batch sizes must be positive integers, got {b!r} in {batch_sizes}")
    if b > pool:
      raise ValueError(f"batch size {b} exceeds the pool of {pool} rows in data; expected at most {pool}")
  for name, fn in (("grad_fn", grad_fn), ("draw_batch", draw_batch)):
    if not callable(fn):
      raise ValueError(f"{name} must be callable, got {fn!r} of type {type(fn).__name__}")
  params, data, key = parallel.replicate((params, data, key), mesh)
  results = {}
  with parallel.use_mesh(mesh):
    for b in batch_sizes:
      g = _measure_drawn(
          grad_fn, params, data, key, batch_size=int(b), num_batches=int(num_batches), draw_batch=draw_batch,
          chunk_size=chunk_size, strategy=strategy,
      )
      results[int(b)] = g._replace(num_batches=int(num_batches))
  return results


def from_per_sample(per_sample_grads, batch_size: int) -> GSNR:
  """GSNR of the mean gradient of `batch_size` iid samples, from n per-sample gradients (n, ...).

  For a mean of b iid samples E g = per-sample mean and Var g = per-sample variance / b, so
  GSNR_b = b * per-sample GSNR. The per-sample variance is unbiased (ddof=1), as in `summarize`, so
  the result is exactly b times `summarize(per_sample_grads)` and estimates the GSNR under the data
  distribution the n samples come from. For draws with replacement from exactly these n rows the
  variance is the ddof=0 one, smaller by the factor (n - 1) / n.
  """
  num = _leading_size(per_sample_grads, "per_sample_grads")
  if num < 2:
    raise ValueError(f"from_per_sample needs at least 2 per-sample gradients, got {num}")
  checks.check_int("batch_size", batch_size)
  means, variances = _moments(per_sample_grads)
  g = _from_moments(means, variances, num)
  return g._replace(
      per_param=jax.tree.map(lambda r: batch_size * r, g.per_param),
      mean=batch_size * g.mean,
      median=batch_size * g.median,
      aggregate=batch_size * g.aggregate,
      noise=g.noise / batch_size,
  )


def as_dict(g: GSNR) -> dict[str, float | int]:
  """The scalar summaries of `g` as Python numbers, for JSON (the per-entry values are left out)."""
  return {
      "mean": float(g.mean),
      "median": float(g.median),
      "aggregate": float(g.aggregate),
      "signal": float(g.signal),
      "noise": float(g.noise),
      "num_batches": int(g.num_batches),
  }
