"""Per-sample losses, gradients, gradient norms and gradient dot products, as pure JAX functions.

The batch is axis 0 of `x` and `y` everywhere. Functions are not jitted here: jit the step that calls
them, with the model (a Flax module) and the loss function as static structure.

Two paths compute the same numbers:

* `vmap`: `jax.vmap(jax.grad(per-example loss))`, chunked with `jax.lax.map(..., batch_size=...)`
  so that at most `chunk_size x P` gradient values exist at once. Works for any layer.
* `ghost`: for a dense layer with per-sample input a_i (in,) and loss-to-output gradient d_i (out,)
  the per-sample kernel gradient is a_i d_i^T, so

      ||grad_i W||^2 = ||a_i||^2 ||d_i||^2,        <grad_i W, G> = a_i^T G d_i,

  and the bias gradient is d_i. A layer applied at several positions t (a convolution over its
  patches) sums a_{i,t} d_{i,t}^T over t. One forward pass and one backward pass to the layer outputs
  give every `GhostDense` / `GhostConv` layer's share without forming a (B x P) tensor. Parameters of
  any other layer fall back to the chunked `vmap` path, for those parameters only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from metasel.models import GHOST_INPUTS, GHOST_OUTPUTS, kernel_as_matrix

__all__ = [
    "LossFn",
    "GhostTape",
    "softmax_cross_entropy",
    "squared_error",
    "losses",
    "embedding_norms",
    "zero_perturbations",
    "taped_forward",
    "tape_of",
    "record",
    "example_grad_fn",
    "grads",
    "grad_norms",
    "grad_dots",
]

Params = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs (B, O), targets (B,)) -> (B,)
Method = Literal["ghost", "vmap"]
Path = tuple[str, ...]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample cross-entropy (B,) of logits (B, C) against integer labels (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-sample squared error (B,) of scalar predictions (B, 1) against targets (B,)."""
  return jnp.square(outputs[:, 0] - targets)


def _check_batch(x: jax.Array, y: jax.Array) -> None:
  """Raise a clear error when inputs and targets do not describe the same batch."""
  if jnp.ndim(y) != 1:
    raise ValueError(f"targets must have shape (batch,), got shape {jnp.shape(y)}")
  if jnp.shape(x)[0] != jnp.shape(y)[0]:
    raise ValueError(
        f"inputs and targets disagree on the batch size: x has {jnp.shape(x)[0]} rows,"
        f" y has {jnp.shape(y)[0]}; expected the same batch axis 0"
    )


def losses(model: nn.Module, params: Params, x: jax.Array, y: jax.Array, loss_fn: LossFn) -> jax.Array:
  """Per-sample losses (B,) of `model` with `params` on the batch (x, y)."""
  _check_batch(x, y)
  outputs, _ = model.apply({"params": params}, x)
  return loss_fn(outputs, y)


def embedding_norms(model: nn.Module, params: Params, x: jax.Array) -> jax.Array:
  """L2 norms (B,) of each sample's penultimate embedding."""
  _, embedding = model.apply({"params": params}, x)
  return jnp.linalg.norm(embedding, axis=-1)


class GhostTape(NamedTuple):
  """What one forward and one backward pass to the dense-layer outputs record.

  Attributes:
    losses: per-sample losses (B,).
    outputs: model outputs (B, O).
    embeddings: penultimate embeddings (B, D).
    inputs: for each `GhostDense` module path, its per-sample inputs a (B, in).
    output_grads: for each such path, d loss_i / d output_i (B, out).
  """

  losses: jax.Array
  outputs: jax.Array
  embeddings: jax.Array
  inputs: dict[Path, jax.Array]
  output_grads: dict[Path, jax.Array]


def zero_perturbations(model: nn.Module, params: Params, x: jax.Array) -> dict:
  """Zero perturbations with the shapes of every ghost layer's output for this batch ({} for none)."""
  shapes = jax.eval_shape(
      lambda p, xb: model.apply({"params": p}, xb, mutable=[GHOST_OUTPUTS])[1], params, x
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.get(GHOST_OUTPUTS, {}))


def taped_forward(model: nn.Module, params: Params, perturbations: dict, x: jax.Array, y: jax.Array, loss_fn: LossFn):
  """Per-sample losses (B,) and `(outputs, embeddings, layer inputs)` of a forward pass with ghost perturbations.

  Differentiating the losses with respect to `perturbations` gives each ghost layer's output gradients;
  `jax.vjp` with respect to params and perturbations gives both from one backward pass.
  """
  (outputs, embeddings), recorded = model.apply(
      {"params": params, GHOST_OUTPUTS: perturbations}, x, mutable=[GHOST_INPUTS]
  )
  return loss_fn(outputs, y), (outputs, embeddings, recorded.get(GHOST_INPUTS, {}))


def tape_of(losses, outputs, embeddings, inputs, output_grads, *, strict: bool = True) -> GhostTape:
  """A `GhostTape` from a `taped_forward` pass and the gradients of its perturbations.

  A layer called more than once in the pass has no single input to pair with its output gradient:
  `strict` raises for it, otherwise it is left off the tape.
  """
  flat_inputs, flat_grads = {}, {key[:-1]: g for key, g in traverse_util.flatten_dict(output_grads).items()}
  for key, calls in traverse_util.flatten_dict(inputs).items():
    if len(calls) == 1:
      flat_inputs[key[:-1]] = calls[0]
    elif strict:
      raise ValueError(
          f"GhostDense layer {'/'.join(key[:-1])} was called {len(calls)} times in one forward pass;"
          " the ghost identity needs each layer used once"
      )
  flat_grads = {path: g for path, g in flat_grads.items() if path in flat_inputs}
  return GhostTape(losses, outputs, embeddings, flat_inputs, flat_grads)


def record(model: nn.Module, params: Params, x: jax.Array, y: jax.Array, loss_fn: LossFn) -> GhostTape:
  """Run the model once forward and once backward to its dense outputs, recording a `GhostTape`.

  The backward pass reaches only the layer outputs, not the weights, so it costs less than a plain
  gradient: the (B x in x out) weight-gradient products are never formed.
  """
  _check_batch(x, y)
  perturbations = zero_perturbations(model, params, x)

  def summed_loss(perturbations):
    per_sample, aux = taped_forward(model, params, perturbations, x, y, loss_fn)
    return jnp.sum(per_sample), (per_sample, *aux)

  output_grads, (per_sample, outputs, embeddings, inputs) = jax.grad(summed_loss, has_aux=True)(perturbations)
  return tape_of(per_sample, outputs, embeddings, inputs, output_grads)


def _split_params(params: Params, ghost_paths) -> tuple[dict, dict]:
  """Flat (path -> array) dicts of ghost-layer parameters and of every other parameter."""
  ghost, other = {}, {}
  for key, value in traverse_util.flatten_dict(params).items():
    (ghost if key[:-1] in ghost_paths else other)[key] = value
  return ghost, other


def _per_example_map(fn, x, y, chunk_size: int | None):
  """Map `fn(x_i, y_i)` over the batch: a full `vmap`, or `lax.map` over chunks of `chunk_size`."""
  if chunk_size is None or chunk_size >= x.shape[0]:
    return jax.vmap(fn)(x, y)
  return jax.lax.map(lambda xy: fn(*xy), (x, y), batch_size=chunk_size)


def example_grad_fn(model: nn.Module, loss_fn: LossFn, frozen: dict):
  """`(trainable, x_i, y_i) -> grad`: one example's loss gradient w.r.t. the `trainable` flat params.

  Params are flat dicts (`flax.traverse_util.flatten_dict`); `frozen` holds the others.
  """

  def example_loss(trainable, x_i, y_i):
    params = traverse_util.unflatten_dict({**frozen, **trainable})
    outputs, _ = model.apply({"params": params}, x_i[None])
    return loss_fn(outputs, y_i[None])[0]

  return jax.grad(example_loss)


def grads(
    model: nn.Module,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
) -> Params:
  """Per-sample gradients: a pytree like `params` whose leaves have a leading batch axis (B, ...).

  This materialises B x P values; prefer `grad_norms` / `grad_dots` when only those are needed.
  """
  _check_batch(x, y)

  def example_grad(x_i, y_i):
    def example_loss(p):
      outputs, _ = model.apply({"params": p}, x_i[None])
      return loss_fn(outputs, y_i[None])[0]

    return jax.grad(example_loss)(params)

  return _per_example_map(example_grad, x, y, chunk_size)


def _vmap_reduce(model, loss_fn, params, x, y, reduce, *, only: dict | None, chunk_size):
  """Per-sample `reduce(flat_grad_i)` (B,) over the parameters in `only` (all when None), chunked."""
  flat = traverse_util.flatten_dict(params)
  trainable = flat if only is None else only
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  grad_fn = example_grad_fn(model, loss_fn, frozen)
  return _per_example_map(lambda x_i, y_i: reduce(grad_fn(trainable, x_i, y_i)), x, y, chunk_size)


def _tree_sq_norm(tree) -> jax.Array:
  return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))


def _positions(tape: GhostTape, path: Path) -> tuple[jax.Array, jax.Array]:
  """A layer's inputs (B, T, in) and output gradients (B, T, out), positions T flattened (1 for dense)."""
  a, d = tape.inputs[path], tape.output_grads[path]
  batch = a.shape[0]
  return a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])


def _kernel_sq_norms(a: jax.Array, d: jax.Array) -> jax.Array:
  """||sum_t a_t d_t^T||_F^2 per sample (B,) for a (B, T, in), d (B, T, out).

  Through the Gram identity sum_{t,s} <a_t, a_s><d_t, d_s> when T^2 <= in * out (always for a plain
  dense layer, T = 1), else by forming each sample's (in, out) layer gradient: whichever is smaller.
  """
  positions, fan_in, fan_out = a.shape[1], a.shape[2], d.shape[2]
  if positions * positions <= fan_in * fan_out:
    return jnp.sum(jnp.einsum("bti,bsi->bts", a, a) * jnp.einsum("bto,bso->bts", d, d), axis=(1, 2))
  return jnp.sum(jnp.square(jnp.einsum("bti,bto->bio", a, d)), axis=(1, 2))


def _ghost_sq_norms(tape: GhostTape, ghost_params: dict) -> jax.Array:
  """Sum over ghost layers of each sample's squared kernel and bias gradient norms, shape (B,)."""
  total = jnp.zeros_like(tape.losses)
  for path in tape.inputs:
    a, d = _positions(tape, path)
    total = total + _kernel_sq_norms(a, d)
    if path + ("bias",) in ghost_params:
      total = total + jnp.sum(jnp.square(jnp.sum(d, axis=1)), axis=-1)
  return total


def _ghost_dots(tape: GhostTape, ref_flat: dict) -> jax.Array:
  """Sum over ghost layers of sum_t a_t^T G d_t (kernel) + <sum_t d_t, g_b> (bias), shape (B,)."""
  total = jnp.zeros_like(tape.losses)
  for path in tape.inputs:
    a, d = _positions(tape, path)
    total = total + jnp.sum((a @ kernel_as_matrix(ref_flat[path + ("kernel",)])) * d, axis=(1, 2))
    bias = ref_flat.get(path + ("bias",))
    if bias is not None:
      total = total + jnp.sum(d, axis=1) @ bias
  return total


def grad_norms(
    model: nn.Module,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss_fn: LossFn,
    *,
    method: Method = "ghost",
    chunk_size: int | None = None,
    tape: GhostTape | None = None,
) -> jax.Array:
  """L2 norms (B,) of each sample's loss gradient with respect to all of `params`.

  Args:
    model: Flax module returning `(outputs, embedding)`.
    params: its parameters.
    x: inputs, batch axis 0. y: targets (B,).
    loss_fn: per-sample loss `(outputs, targets) -> (B,)`.
    method: "ghost" (exact ghost identity on dense layers, chunked vmap on the rest) or "vmap".
    chunk_size: examples per vmapped chunk on the vmap path (None: the whole batch at once).
    tape: a `record` of this batch at `params` to reuse on the ghost path (recorded here when None).
  """
  _check_method(method)
  _check_batch(x, y)
  if method == "vmap":
    return jnp.sqrt(_vmap_reduce(model, loss_fn, params, x, y, _tree_sq_norm, only=None, chunk_size=chunk_size))
  tape = record(model, params, x, y, loss_fn) if tape is None else tape
  ghost, other = _split_params(params, set(tape.inputs))
  sq = _ghost_sq_norms(tape, ghost)
  if other:
    sq = sq + _vmap_reduce(model, loss_fn, params, x, y, _tree_sq_norm, only=other, chunk_size=chunk_size)
  return jnp.sqrt(sq)


def grad_dots(
    model: nn.Module,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    ref_grad: Params,
    loss_fn: LossFn,
    *,
    method: Method = "ghost",
    chunk_size: int | None = None,
) -> jax.Array:
  """Dot products (B,) of each sample's loss gradient with a reference gradient `ref_grad`.

  `ref_grad` has the structure of `params`, e.g. the mean gradient of a validation batch; then
  `-lr * grad_dots(...)` is each sample's first-order effect on the validation loss of one SGD step.
  Arguments are as in `grad_norms`.
  """
  _check_method(method)
  _check_batch(x, y)
  ref_flat = traverse_util.flatten_dict(ref_grad)
  param_keys = set(traverse_util.flatten_dict(params))
  if set(ref_flat) != param_keys:
    raise ValueError(
        "ref_grad must have the structure of params; differing entries:"
        f" {sorted('/'.join(k) for k in set(ref_flat) ^ param_keys)}"
    )

  def dot_with_ref(flat_grad):
    return sum(jnp.vdot(g, ref_flat[k]) for k, g in flat_grad.items())

  if method == "vmap":
    return _vmap_reduce(model, loss_fn, params, x, y, dot_with_ref, only=None, chunk_size=chunk_size)
  tape = record(model, params, x, y, loss_fn)
  _, other = _split_params(params, set(tape.inputs))
  dots = _ghost_dots(tape, ref_flat)
  if other:
    dots = dots + _vmap_reduce(model, loss_fn, params, x, y, dot_with_ref, only=other, chunk_size=chunk_size)
  return dots


def _check_method(method: str) -> None:
  if method not in ("ghost", "vmap"):
    raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}")
