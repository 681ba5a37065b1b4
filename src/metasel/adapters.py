"""The model contract: a user's Flax linen module, Flax NNX module or `apply(params, x)` function as one `Model`.

Every metasel entry point (persample, signals, mts, dvn, gsnr, train) takes any of the three and calls
`as_model` on it. A `Model` is two pure functions of the parameters, `apply(params, x)` and
`init(key, x)`, and compares equal to another `Model` of the same structure, so that compiled programs
are shared between them.

Boxed linen parameters (`nn.Partitioned`, `nn.LogicallyPartitioned`) are unboxed at the boundary, so
what `module.init` returns works as it is; NNX variables with sharding metadata split to plain arrays.

What a model may return: its logits (B, O), or a pair `(logits (B, O), embedding (B, D))`. When it
returns only logits, metasel takes the embedding from the input of its last dense layer
(`metasel.tape`). Parameters are a pytree (nested dicts for linen and NNX); a model whose output
needs other state (BatchNorm's `batch_stats`, NNX `BatchStat`) or random numbers (dropout) is refused
with an error naming the collection: per-sample gradients need each sample's loss to depend on that
sample and the parameters alone.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, Literal

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


__all__ = ["Model", "ModelLike", "Params", "as_model", "split_outputs", "init", "check_params", "check_output"]

Params = Any
ModelLike = Any  # a Model, a flax.linen.Module, a flax.nnx.Module, or an apply(params, x) function
Kind = Literal["linen", "nnx", "function"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model as pure functions of its parameters.

  Attributes:
    apply: `(params, x (B, ...)) -> logits (B, O)` or `(logits, embedding (B, D))`.
    init: `(key, x) -> params`, or None for a function given without one.
    kind: "linen", "nnx" or "function".
    identity: what two equal models share (the linen module, the NNX graph definition, the function).
    name: a label for messages.
  """

  apply: Callable[[Params, jax.Array], Any]
  init: Callable[[jax.Array, jax.Array], Params] | None
  kind: Kind
  identity: Hashable
  name: str

  def __eq__(self, other) -> bool:
    return isinstance(other, Model) and (self.kind, self.identity) == (other.kind, other.identity)

  def __hash__(self) -> int:
    return hash((self.kind, self.identity))


def as_model(model: ModelLike, *, init: Callable | None = None) -> Model:
  """The `Model` of a linen module, an NNX module or an `apply(params, x)` function (a `Model` as it is).

  `init` gives a function model its `(key, x) -> params`; linen and NNX models bring their own (an
  NNX module's `init` returns its current parameters, whatever the key: NNX modules are built
  initialised).
  """
  if isinstance(model, Model):
    return model
  if isinstance(model, nn.Module):
    return _linen(model)
  if isinstance(model, nnx.Module):
    return _nnx(model)
  if callable(model):
    name = getattr(model, "__name__", type(model).__name__)
    return Model(_translating_errors(model, name), init, "function", _hashable(model), name)
  raise ValueError(
      f"model must be a flax.linen Module, a flax.nnx Module or a function apply(params, x); got {type(model).__name__}"
  )


class _ByIdentity:
  """Stands for a value that has no value equality: equal only to the same object (which it keeps alive)."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _ByIdentity) and other.value is self.value

  def __hash__(self) -> int:
    return id(self.value)


def _hashable(value: Any) -> Hashable:
  """`value` itself when it can key a program, else a key equal only to the same object."""
  try:
    hash(value)
  except TypeError:
    return _ByIdentity(value)
  return value


def _linen(module: nn.Module) -> Model:
  name = type(module).__name__

  def apply(params, x):
    # Boxed parameters (nn.with_partitioning / nn.with_logical_partitioning) as `init` returns them are
    # unboxed here, keeping the same arrays, so the tape finds each layer's parameters among the leaves.
    return module.apply({"params": nn.meta.unbox(params)}, x)

  def init_params(key, x):
    variables = module.init(key, x)
    extra = sorted(set(variables) - {"params", "intermediates"})
    if extra:
      raise ValueError(_state_message(name, f"the collection(s) {extra}"))
    return nn.meta.unbox(variables.get("params", {}))

  return Model(_translating_errors(apply, name), init_params, "linen", _hashable(module), name)


def _nnx(module: nnx.Module) -> Model:
  name = type(module).__name__
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  leftover = jax.tree.leaves(rest)
  if leftover:
    kinds = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
    raise ValueError(_state_message(name, f"NNX state other than nnx.Param ({', '.join(kinds)})"))
  initial = params.to_pure_dict()

  def apply(params, x):
    merged = nnx.merge(graphdef, params)
    if (hook := NNX_MERGED.get()) is not None:
      hook(merged)
    return merged(x)

  return Model(_translating_errors(apply, name), lambda key, x: initial, "nnx", graphdef, name)


# Called on every freshly merged copy of an NNX model before it runs (never on the user's module): the
# tape sets it while it records, to hook the copy's layers.
NNX_MERGED: contextvars.ContextVar[Callable[[nnx.Module], None] | None] = contextvars.ContextVar(
    "metasel_nnx_merged", default=None
)


def _state_message(name: str, what: str) -> str:
  return (
      f"model {name} holds {what}; metasel's per-sample gradients and training loop need a model whose"
      " output depends on its parameters and each sample alone: use LayerNorm instead of BatchNorm, and"
      " build dropout deterministic (or leave it out)"
  )


def _translating_errors(apply: Callable, name: str) -> Callable:
  """`apply` with Flax's errors for missing collections and random streams said in metasel's terms."""

  def checked(params, x):
    try:
      return apply(params, x)
    except flax.errors.ScopeCollectionNotFound as err:
      raise ValueError(_state_message(name, f"state it reads from a collection ({err})")) from None
    except flax.errors.InvalidRngError as err:
      raise ValueError(_state_message(name, f"layers that draw random numbers ({err})")) from None

  return checked


def split_outputs(raw: Any, batch_size: int) -> tuple[jax.Array, jax.Array | None]:
  """(logits (B, O), embedding (B, D) or None) from what a model returned; a clear error for anything else."""
  if isinstance(raw, (tuple, list)) and len(raw) == 2:
    logits, embedding = raw
    check_output(logits, batch_size, "logits")
    check_output(embedding, batch_size, "embedding")
    return logits, embedding
  if isinstance(raw, (tuple, list)) or not hasattr(raw, "shape"):
    raise ValueError(
        f"the model returned {_describe(raw)}; expected its logits (batch, outputs) or a pair"
        " (logits (batch, outputs), embedding (batch, features))"
    )
  check_output(raw, batch_size, "logits")
  return raw, None


def check_output(value: Any, batch_size: int, what: str) -> None:
  """Raise unless `value` is an array (batch_size, n)."""
  if not hasattr(value, "shape") or len(value.shape) != 2 or value.shape[0] != batch_size:
    raise ValueError(
        f"the model returned {what} as {_describe(value)}; expected an array of shape ({batch_size}, n)"
        f" for a batch of {batch_size}"
    )


def _describe(value: Any) -> str:
  if hasattr(value, "shape"):
    return f"an array of shape {tuple(value.shape)}"
  if isinstance(value, (tuple, list)):
    return f"a {type(value).__name__} of {len(value)}: ({', '.join(_describe(v) for v in value)})"
  return f"a {type(value).__name__}"


def init(model: ModelLike, key: jax.Array, input_shape: tuple[int, ...], dtype=jnp.float32) -> Params:
  """Initial parameters of `model` for inputs of per-sample shape `input_shape` (no batch axis).

  Checks, before any training, that the model takes such a batch and returns logits or a pair.
  """
  model = as_model(model)
  if model.init is None:
    raise ValueError(
        f"model {model.name} is a function without an init; pass its parameters (params=...) or"
        " metasel.models.as_model(apply, init=...)"
    )
  params = model.init(key, jnp.zeros((1, *input_shape), dtype))
  check_params(model, params, input_shape, dtype)
  return params


def check_params(model: ModelLike, params: Params, input_shape: tuple[int, ...], dtype=jnp.float32) -> None:
  """Raise a clear error, before any compute, when `model` with `params` does not take a batch of samples of
  shape `input_shape` and return logits or a pair (only shapes are traced)."""
  model = as_model(model)
  split_outputs(jax.eval_shape(model.apply, params, jnp.zeros((1, *input_shape), dtype)), 1)
