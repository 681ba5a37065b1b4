"""Per-sample losses, gradients, gradient norms and gradient dot products, on any Flax model, as pure JAX functions.

`model` is a Flax linen module, a Flax NNX module or an `apply(params, x)` function (`metasel.adapters`);
the batch is axis 0 of `x` and `y` everywhere. Nothing is jitted here: jit the step that calls these.

Two paths compute the same numbers:

* "ghost": one forward pass and one backward pass to the layer outputs tape every standard layer
  (`metasel.tape`), and each sample's norm or dot product follows from the ghost identity without
  forming a (B x P) tensor (`metasel.ghost`): for a dense layer with input a_i and output gradient d_i,
  ||a_i d_i^T||^2 = ||a_i||^2 ||d_i||^2 and <a_i d_i^T, G> = a_i^T G d_i.
* "vmap": `jax.vmap(jax.grad(per-example loss))`, chunked with `jax.lax.map(..., batch_size=...)` so that at
  most `chunk_size x P` gradient values exist at once. Works for any parameter; the ghost path uses it
  for the parameters no taped layer owns, and warns once per model when they are more than
  `FALLBACK_WARNING_SHARE` of the model. `coverage` says which parameters take which path, and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metasel import ghost, handlers
from metasel import tape as tape_lib
from metasel.adapters import Model, ModelLike, as_model, split_outputs

__all__ = [
    "LossFn",
    "Strategy",
    "FALLBACK_WARNING_SHARE",
    "softmax_cross_entropy",
    "squared_error",
    "outputs",
    "losses",
    "outputs_and_embeddings",
    "embeddings",
    "embedding_norms",
    "record",
    "grads",
    "grad_norms",
    "grad_dots",
    "Coverage",
    "coverage",
    "leaf_names",
    "example_grad_fn",
    "fallback_leaves",
    "flat_grads",
]

Params = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs (B, O), targets (B,)) -> (B,)
Strategy = Literal["ghost", "vmap"]
FALLBACK_WARNING_SHARE = 0.01  # warn when more than this share of parameter entries leaves the ghost path


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


def outputs(model: ModelLike, params: Params, x: jax.Array) -> jax.Array:
  """The model's outputs (logits) (B, O) on x (B, ...)."""
  return split_outputs(as_model(model).apply(params, x), jnp.shape(x)[0])[0]


def losses(model: ModelLike, params: Params, x: jax.Array, y: jax.Array, loss_fn: LossFn) -> jax.Array:
  """Per-sample losses (B,) of `model` with `params` on the batch (x, y)."""
  _check_batch(x, y)
  return loss_fn(outputs(model, params, x), y)


def outputs_and_embeddings(model: ModelLike, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The model's outputs (B, O) and each sample's embedding (B, D), from one forward pass.

  The embedding is the one the model returns, else the input of its last dense layer.
  """
  model = as_model(model)
  fwd = tape_lib.forward(model, params, x)
  return fwd.outputs, _require_embeddings(fwd.embeddings, model)


def embeddings(model: ModelLike, params: Params, x: jax.Array) -> jax.Array:
  """Each sample's embedding (B, D) (see `outputs_and_embeddings`)."""
  return outputs_and_embeddings(model, params, x)[1]


def _require_embeddings(value: jax.Array | None, model: Model) -> jax.Array:
  if value is None:
    raise ValueError(
        f"model {model.name} returns logits only and has no dense layer whose input could serve as the"
        " embedding; return (logits, embedding) from the model"
    )
  return value


def embedding_norms(model: ModelLike, params: Params, x: jax.Array) -> jax.Array:
  """L2 norms (B,) of each sample's embedding (see `embeddings`)."""
  return jnp.linalg.norm(embeddings(model, params, x), axis=-1)


def record(model: ModelLike, params: Params, x: jax.Array, y: jax.Array, loss_fn: LossFn) -> tape_lib.Tape:
  """Run the model once forward and once backward to its layer outputs, recording a `tape_lib.Tape`.

  The backward pass reaches only the layer outputs, not the weights, so it costs less than a plain
  gradient: the (B x in x out) weight-gradient products are never formed.
  """
  _check_batch(x, y)
  model = as_model(model)
  plan = tape_lib.make_plan(model, params, x)

  def summed_loss(perturbations):
    fwd = tape_lib.forward(model, params, x, perturbations=perturbations, plan=plan)
    per_sample = loss_fn(fwd.outputs, y)
    return jnp.sum(per_sample), (per_sample, fwd)

  output_grads, (per_sample, fwd) = jax.grad(summed_loss, has_aux=True)(tape_lib.zero_perturbations(plan))
  return tape_lib.assemble(fwd, output_grads, per_sample)


# ----------------------------------------------------------------------------------------------------
# The vmap path, for any subset of the parameter leaves.


def _per_example_map(fn, x, y, chunk_size: int | None):
  """Map `fn(x_i, y_i)` over the batch: a full `vmap`, or `lax.map` over chunks of `chunk_size`."""
  if chunk_size is None or chunk_size >= x.shape[0]:
    return jax.vmap(fn)(x, y)
  return jax.lax.map(lambda xy: fn(*xy), (x, y), batch_size=chunk_size)


def example_grad_fn(model: ModelLike, loss_fn: LossFn, params: Params, trainable: tuple[int, ...]):
  """`(leaves, x_i, y_i) -> grads`: one example's loss gradient w.r.t. the parameter leaves numbered `trainable`.

  `leaves` is the tuple of those leaves (in `jax.tree.leaves(params)` order); the other leaves of
  `params` are held fixed.
  """
  model = as_model(model)
  all_leaves, treedef = jax.tree.flatten(params)

  def example_loss(leaves, x_i, y_i):
    merged = list(all_leaves)
    for index, leaf in zip(trainable, leaves):
      merged[index] = leaf
    return loss_fn(outputs(model, treedef.unflatten(merged), x_i[None]), y_i[None])[0]

  return jax.grad(example_loss)


def _vmap_reduce(model, loss_fn, params, x, y, reduce, leaves: tuple[int, ...], chunk_size):
  """Per-sample `reduce({leaf index: gradient})` (B, ...) over the parameter leaves numbered `leaves`, chunked."""
  all_leaves = jax.tree.leaves(params)
  grad_fn = example_grad_fn(model, loss_fn, params, leaves)
  trainable = tuple(all_leaves[i] for i in leaves)
  return _per_example_map(lambda x_i, y_i: reduce(dict(zip(leaves, grad_fn(trainable, x_i, y_i)))), x, y, chunk_size)


def grads(
    model: ModelLike,
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
  model = as_model(model)
  example_grad = jax.grad(lambda p, x_i, y_i: loss_fn(outputs(model, p, x_i[None]), y_i[None])[0])
  return _per_example_map(lambda x_i, y_i: example_grad(params, x_i, y_i), x, y, chunk_size)


# ----------------------------------------------------------------------------------------------------
# The ghost path.

_WARNED: set = set()


def fallback_leaves(model: ModelLike, params: Params, recorded: tape_lib.Tape) -> tuple[int, ...]:
  """The parameter leaves no ghost layer of `recorded` covers, which need per-sample gradients by `vmap`.

  Warns once per model when they are more than `FALLBACK_WARNING_SHARE` of the parameter entries.
  """
  model = as_model(model)
  taped = recorded.taped_leaves
  sizes = [int(np.prod(jnp.shape(leaf))) for leaf in jax.tree.leaves(params)]
  other = tuple(i for i in range(len(sizes)) if i not in taped)
  share = sum(sizes[i] for i in other) / max(sum(sizes), 1)
  if share > FALLBACK_WARNING_SHARE and model not in _WARNED:
    _WARNED.add(model)
    names = leaf_names(params)
    listed = ", ".join(names[i] for i in other[:5]) + (", ..." if len(other) > 5 else "")
    warnings.warn(
        f"{share:.0%} of the parameters of model {model.name} ({listed}) take the slow vmap path for"
        " per-sample gradients; metasel.persample.coverage(model, params, x) says which and why",
        stacklevel=3,
    )
  return other


def flat_grads(model: ModelLike, params: Params, x: jax.Array, y: jax.Array, loss_fn: LossFn, leaves: tuple[int, ...]) -> jax.Array:
  """Per-sample gradients (B, P_f) of the parameter leaves numbered `leaves`, flattened and joined, by `vmap`."""
  flatten = lambda grads: jnp.concatenate([grads[i].reshape(-1) for i in leaves])  # noqa: E731
  return _vmap_reduce(as_model(model), loss_fn, params, x, y, flatten, leaves, None)


def _per_sample_sum(model, params, x, y, loss_fn, per_layer, reduce, method, chunk_size, given) -> jax.Array:
  """Sum over parameters of a per-sample quantity (B,): `per_layer(layer)` over the taped layers plus `reduce`
  of the vmapped gradients of the leaves they leave out (every leaf with method="vmap")."""
  if method == "vmap":
    return _vmap_reduce(model, loss_fn, params, x, y, reduce, tuple(range(len(jax.tree.leaves(params)))), chunk_size)
  recorded = record(model, params, x, y, loss_fn) if given is None else given
  total = jnp.zeros(x.shape[0], jnp.float32)
  for layer in recorded.ghost_layers:
    total = total + per_layer(layer)
  other = fallback_leaves(model, params, recorded)
  if other:
    total = total + _vmap_reduce(model, loss_fn, params, x, y, reduce, other, chunk_size)
  return total


def _check_strategy(method: str) -> None:
  if method not in ("ghost", "vmap"):
    raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}")


def _tree_sq_norm(grads: dict[int, jax.Array]) -> jax.Array:
  return sum(jnp.vdot(g, g) for g in grads.values())


def grad_norms(
    model: ModelLike,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss_fn: LossFn,
    *,
    method: Strategy = "ghost",
    chunk_size: int | None = None,
    tape: tape_lib.Tape | None = None,
) -> jax.Array:
  """L2 norms (B,) of each sample's loss gradient with respect to all of `params`.

  Args:
    model: a Flax linen or NNX module, or an `apply(params, x)` function.
    params: its parameters.
    x: inputs, batch axis 0. y: targets (B,).
    loss_fn: per-sample loss `(outputs, targets) -> (B,)`.
    method: "ghost" (taped layers by the ghost identity, chunked vmap for the rest) or "vmap".
    chunk_size: examples per vmapped chunk on the vmap path (None: the whole batch at once).
    tape: a `record` of this batch at `params` to reuse on the ghost path (recorded here when None).
  """
  _check_strategy(method)
  _check_batch(x, y)
  model = as_model(model)
  return jnp.sqrt(_per_sample_sum(model, params, x, y, loss_fn, ghost.sq_norms, _tree_sq_norm, method, chunk_size, tape))


def grad_dots(
    model: ModelLike,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    ref_grad: Params,
    loss_fn: LossFn,
    *,
    method: Strategy = "ghost",
    chunk_size: int | None = None,
    tape: tape_lib.Tape | None = None,
) -> jax.Array:
  """Dot products (B,) of each sample's loss gradient with a reference gradient `ref_grad`.

  `ref_grad` has the structure of `params`, e.g. the mean gradient of a validation batch; then
  `-lr * grad_dots(...)` is each sample's first-order effect on the validation loss of one SGD step.
  Arguments are as in `grad_norms`.
  """
  _check_strategy(method)
  _check_batch(x, y)
  model = as_model(model)
  ref_leaves, ref_def = jax.tree.flatten(ref_grad)
  param_def = jax.tree.structure(params)
  if ref_def != param_def:
    raise ValueError(f"ref_grad must have the structure of params; got {ref_def}, expected {param_def}")

  def dot_with_ref(grads):
    return sum(jnp.vdot(g, ref_leaves[i]) for i, g in grads.items())

  def layer_dots(layer):
    return ghost.dots(layer, {role: ref_leaves[i] for role, i in layer.info.roles})

  return _per_sample_sum(model, params, x, y, loss_fn, layer_dots, dot_with_ref, method, chunk_size, tape)


# ----------------------------------------------------------------------------------------------------
# Coverage


def leaf_names(params: Params) -> list[str]:
  """A readable name per parameter leaf, in `jax.tree.leaves` order, e.g. "Dense_0/kernel"."""

  def part(key) -> str:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  unboxed = nn.meta.unbox(params)  # the same leaves, named without the boxes' "value"
  return ["/".join(part(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(unboxed)[0]]


class Coverage(NamedTuple):
  """Which parameters take the ghost path for a model and batch, and why the others take the vmap fallback.

  Attributes:
    ghost: parameter name -> the layer that tapes it, e.g. "Dense_0 (Dense)".
    fallback: parameter name -> the reason it falls back.
    ghost_share: the share of parameter entries on the ghost path.
  """

  ghost: dict[str, str]
  fallback: dict[str, str]
  ghost_share: float

  def __str__(self) -> str:
    lines = [f"ghost path: {self.ghost_share:.1%} of the parameter entries"]
    lines += [f"  ghost  {name:<40} {layer}" for name, layer in self.ghost.items()]
    lines += [f"  vmap   {name:<40} {reason}" for name, reason in self.fallback.items()]
    return "\n".join(lines)


def coverage(model: ModelLike, params: Params, x: jax.Array) -> Coverage:
  """Report, for `model` on a batch like x (B, ...), which parameters the tape covers and why others fall back.

  Runs no computation (only `jax.eval_shape`).
  """
  model = as_model(model)
  fwd = jax.eval_shape(lambda p, v: tape_lib.forward(model, p, v), params, x)
  names = leaf_names(params)
  sizes = [int(np.prod(jnp.shape(leaf))) for leaf in jax.tree.leaves(params)]
  reasons = {i: f"{s.name} ({s.layer_type}): {s.reason}" for s in fwd.skipped for i in s.leaves}
  layer_of: dict[int, str] = {}  # leaf -> the layer that owns it
  types_of: dict[int, dict[str, None]] = {}  # leaf -> the layer types of its calls, in order
  for c in fwd.calls:
    for i in c.info.leaves:
      layer_of.setdefault(i, c.info.name)
      types_of.setdefault(i, {})[c.info.layer_type] = None
  owners = {i: f"{layer_of[i]} ({' + '.join(types_of[i])})" for i in layer_of}  # e.g. "wte (Embed + Embed.attend)"
  for call in fwd.calls:  # a layer the ghost algebra may not use (`Tape.ghost_layers`) takes all its leaves along
    held = [j for j in call.info.leaves if j in reasons]
    for i in call.info.leaves:
      if held and i not in reasons:
        reasons[i] = f"{owners[i]}: it shares its layer with {names[held[0]]}, which takes the vmap path"
  ghost_names, fallback = {}, {}
  # A layer the tape could not take may hold no outer leaves (under a transformation, or given arrays
  # computed inside the model); its path names the parameters it reads.
  by_path = {s.name + "/": f"{s.name} ({s.layer_type}): {s.reason}" for s in fwd.skipped}
  for i, name in enumerate(names):
    named = [reason for prefix, reason in by_path.items() if name.startswith(prefix)]
    if i in reasons or named:
      fallback[name] = reasons.get(i) or named[0]
    elif i in owners:
      ghost_names[name] = owners[i]
    else:
      fallback[name] = f"not a parameter of a supported layer ({', '.join(handlers.SUPPORTED)})"
  share = sum(sizes[i] for i, n in enumerate(names) if n in ghost_names) / max(sum(sizes), 1)
  return Coverage(ghost_names, fallback, share)
