"""Ghost taping of standard Flax layers, with no change to the user's model.

While `forward` runs a model, every call of a supported layer is seen from outside: linen layers
through Flax's method interception (`nn.intercept_methods`), NNX layers by giving the merged copy's
layer objects a subclass whose `__call__` reports to the tape (the user's own module is untouched).
Interception was picked over a `jax.custom_vjp` probe because it sees the layer's own attributes
(padding, strides, axes) and parameters, needs no change to the traced program, and costs nothing
after tracing: the recorded values are intermediates the forward pass computes anyway.

For each call the tape keeps the layer's input rows (`metasel.ghost`) and adds a zero perturbation to its
output: the gradient of the summed loss with respect to that perturbation is each sample's
loss-to-output gradient. A layer's parameters are found by identity among the leaves of the params
passed to the model, so a layer whose parameters are not plain leaves, or that is used in a way the
tape cannot see, is reported (`Skipped`) and its parameters take the `vmap` fallback.

Supported: linen `Dense`, `DenseGeneral` (contracting trailing axes, no batch dims), `Conv` (any
strides, kernel dilation and padding; groups, input dilation and masks fall back), `Embed`, `LayerNorm`
and `RMSNorm` (over the last axis), and NNX `Linear`, `LinearGeneral`, `Conv`, `Embed`, `LayerNorm`,
`RMSNorm`. A layer's input must have the batch on axis 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.core.tracers import current_trace

from metasel import ghost
from metasel.ghost import DENSE, EMBED, NORM, LayerInfo, LayerTape
from metasel.adapters import Model, split_outputs

__all__ = [
    "Skipped", "Call", "Forward", "Tape", "forward", "zero_perturbations", "joined_calls", "layer_rows", "assemble",
    "hook_nnx",
]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A layer of a supported type that the tape could not take, its parameter leaves and why."""

  name: str
  layer_type: str
  leaves: tuple[int, ...]
  reason: str


@struct.dataclass
class Call:
  """One taped call of a layer: its rows and the shape of its output (where the perturbation goes)."""

  info: LayerInfo = struct.field(pytree_node=False)
  output: jax.ShapeDtypeStruct = struct.field(pytree_node=False)
  rows: jax.Array


@struct.dataclass
class Forward:
  """A taped forward pass: outputs (B, O), embeddings (B, D) or None, the taped calls and skipped layers."""

  outputs: jax.Array
  embeddings: jax.Array | None
  calls: tuple[Call, ...]
  skipped: tuple[Skipped, ...] = struct.field(pytree_node=False)


@struct.dataclass
class Tape:
  """One forward and backward pass: per-sample losses (B,), outputs, embeddings and every taped layer.

  `layers` holds one `ghost.LayerTape` per layer (calls of a layer used several times are joined along
  the position axis); `skipped` names the layers whose parameters need the `vmap` fallback.
  """

  losses: jax.Array
  outputs: jax.Array
  embeddings: jax.Array | None
  layers: tuple[LayerTape, ...]
  skipped: tuple[Skipped, ...] = struct.field(pytree_node=False)

  @property
  def ghost_layers(self) -> tuple[LayerTape, ...]:
    """The layers none of whose parameter leaves a skipped use shares: the ones the ghost algebra may use."""
    shared = {i for s in self.skipped for i in s.leaves}
    return tuple(layer for layer in self.layers if shared.isdisjoint(layer.info.leaves))

  @property
  def taped_leaves(self) -> frozenset[int]:
    """Leaf indices whose per-sample gradients the tape gives exactly: every leaf of the `ghost_layers`."""
    return frozenset(i for layer in self.ghost_layers for i in layer.info.leaves)


# ----------------------------------------------------------------------------------------------------
# Layer handlers: how each supported layer class is read.


def _batch_rows(x: jax.Array, width: int) -> jax.Array:
  return x.reshape(x.shape[0], -1, width)


def _dense_reason(module, x) -> str | None:
  custom = getattr(module, "dot_general", None)
  if (custom is not None and custom is not jax.lax.dot_general) or getattr(module, "dot_general_cls", None):
    return "it uses a custom dot_general"
  return None if x.ndim >= 2 else f"its input has shape {x.shape}, with no batch axis before the features"


def _general_axes(module, x) -> tuple[int, str | None]:
  """Number of trailing contracted axes of a DenseGeneral / LinearGeneral, or why it cannot be taped."""
  axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  axes = tuple(sorted(a % x.ndim for a in axes))
  batch = getattr(module, "batch_dims", ()) or tuple(getattr(module, "batch_axis", {}) or ())
  if batch:
    return 0, "it has batch dimensions of its own"
  if axes != tuple(range(x.ndim - len(axes), x.ndim)) or x.ndim - len(axes) < 1:
    return 0, f"it contracts axes {axes} of a {x.ndim}-d input, not trailing axes after the batch"
  return len(axes), _dense_reason(module, x)


def _spatial_config(module, x):
  """(kernel_size, strides, kernel_dilation, padding pairs, pre-padded x) of a Conv, or a reason string."""
  ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  n = len(ks)
  as_tuple = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))  # noqa: E731
  strides, dilation = as_tuple(module.strides), as_tuple(module.kernel_dilation)
  if as_tuple(module.input_dilation) != (1,) * n:
    return "it dilates its input (input_dilation)"
  if module.feature_group_count != 1:
    return "it is a grouped convolution (feature_group_count > 1)"
  if getattr(module, "mask", None) is not None:
    return "it masks its kernel"
  custom = getattr(module, "conv_general_dilated", None)
  if (custom is not None and custom is not jax.lax.conv_general_dilated) or getattr(module, "conv_general_dilated_cls", None):
    return "it uses a custom convolution"
  if x.ndim != n + 2:
    return f"its input has shape {x.shape}; expected (batch, {n} spatial axes, channels)"
  padding = nn.linear.canonicalize_padding(module.padding, n)
  dilated = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
  if padding in ("CIRCULAR", "REFLECT"):
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    x = jnp.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)], mode=mode)
    padding = "VALID"
  elif padding == "CAUSAL":
    x = jnp.pad(x, [(0, 0), (dilated[0] - 1, 0), (0, 0)])
    padding = "VALID"
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
  return ks, strides, dilation, tuple(tuple(p) for p in padding), x


def conv_patches(x: jax.Array, kernel_size, strides, dilation, padding) -> jax.Array:
  """Patches (B, P, K * C) of images x (B, *spatial, C), ordered (kernel offsets..., channel) like the kernel.

  Built from strided slices, one per kernel offset: a copy, cheaper on CPU than the identity convolution
  of `lax.conv_general_dilated_patches`.
  """
  x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
  spatial = x.shape[1:-1]
  out = [(s - (k - 1) * d - 1) // st + 1 for s, k, d, st in zip(spatial, kernel_size, dilation, strides)]
  slices = []
  for offsets in itertools.product(*(range(k) for k in kernel_size)):
    start = [o * d for o, d in zip(offsets, dilation)]
    limit = [b + (m - 1) * st + 1 for b, m, st in zip(start, out, strides)]
    slices.append(jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1)))
  patches = jnp.stack(slices, axis=-2)  # (B, *out, K, C)
  return patches.reshape(x.shape[0], int(np.prod(out)), -1)


def _standardised(module, x: jax.Array, centred: bool) -> jax.Array:
  """x_hat of a LayerNorm (centred) or RMSNorm over the last axis, as Flax computes it."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  if centred and getattr(module, "use_fast_variance", True):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean))
  elif centred:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  else:
    mean, var = 0.0, jnp.mean(jnp.square(x), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + module.epsilon)


def _norm_reason(module, x) -> str | None:
  last = lambda axes: axes in (-1, (-1,), [-1]) or (isinstance(axes, int) and axes % x.ndim == x.ndim - 1)  # noqa: E731
  if not (last(module.reduction_axes) and last(module.feature_axes)):
    return "it normalises over axes other than the last"
  if getattr(module, "axis_name", None) is not None:
    return "it averages across devices (axis_name)"
  return None if x.ndim >= 2 else f"its input has shape {x.shape}, with no batch axis"


@dataclasses.dataclass(frozen=True)
class Handler:
  """How to tape one layer class: its kind, its parameter roles, and `prepare(module, x)`.

  `prepare` returns `(rows_fn, None)`, where `rows_fn(x)` gives the input rows the kind needs (see
  `metasel.ghost`), or `(None, reason)` when this call cannot be taped.
  """

  kind: str
  roles: tuple[str, ...]
  prepare: Callable[[Any, jax.Array], tuple[Callable[[jax.Array], jax.Array] | None, str | None]]
  dense: bool = False  # a dense layer, whose input is the embedding of a model that returns logits only


def _dense_prepare(module, x):
  reason = _dense_reason(module, x)
  return (None, reason) if reason else ((lambda v: _batch_rows(v, v.shape[-1])), None)


def _general_prepare(module, x):
  count, reason = _general_axes(module, x)
  if reason:
    return None, reason
  width = int(np.prod(x.shape[x.ndim - count :]))
  return (lambda v: _batch_rows(v, width)), None


def _conv_rows(module, x: jax.Array) -> jax.Array:
  ks, strides, dilation, padding, padded = _spatial_config(module, x)
  return conv_patches(padded, ks, strides, dilation, padding)


def _conv_prepare(module, x):
  config = _spatial_config(module, x)
  return (None, config) if isinstance(config, str) else ((lambda v: _conv_rows(module, v)), None)


def _embed_prepare(module, x):
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 1:
    return None, f"its input is {x.dtype} of shape {x.shape}, not integer ids with a batch axis"
  return (lambda v: v.reshape(v.shape[0], -1)), None


def _norm_prepare(centred: bool):
  def prepare(module, x):
    reason = _norm_reason(module, x)
    return (None, reason) if reason else ((lambda v: _batch_rows(_standardised(module, v, centred), v.shape[-1])), None)

  return prepare


_DENSE = Handler(DENSE, ("kernel", "bias"), _dense_prepare, dense=True)
_GENERAL = Handler(DENSE, ("kernel", "bias"), _general_prepare, dense=True)
_CONV = Handler(DENSE, ("kernel", "bias"), _conv_prepare)
_EMBED = Handler(EMBED, ("embedding",), _embed_prepare)
_LAYER_NORM = Handler(NORM, ("scale", "bias"), _norm_prepare(True))
_RMS_NORM = Handler(NORM, ("scale",), _norm_prepare(False))

LINEN_HANDLERS: dict[type, Handler] = {
    nn.Dense: _DENSE, nn.DenseGeneral: _GENERAL, nn.Conv: _CONV, nn.Embed: _EMBED,
    nn.LayerNorm: _LAYER_NORM, nn.RMSNorm: _RMS_NORM,
}
NNX_HANDLERS: dict[type, Handler] = {
    nnx.Linear: _DENSE, nnx.LinearGeneral: _GENERAL, nnx.Conv: _CONV, nnx.Embed: _EMBED,
    nnx.LayerNorm: _LAYER_NORM, nnx.RMSNorm: _RMS_NORM,
}
SUPPORTED = tuple(f"{t.__name__}" for t in LINEN_HANDLERS) + tuple(f"nnx.{t.__name__}" for t in NNX_HANDLERS)


def _handler_of(cls: type, handlers: dict[type, Handler]) -> tuple[type, Handler] | None:
  """The supported base class of `cls` and its handler (whether or not `cls` keeps the base's `__call__`)."""
  for base in cls.__mro__:
    if base in handlers:
      return base, handlers[base]
  return None


# ----------------------------------------------------------------------------------------------------
# The recorder: what one forward pass sees.


class _Recorder:
  """Collects the taped calls of one forward pass, adding perturbations and one sample's step corrections."""

  def __init__(self, params, batch_size: int, perturbations: dict | None, steps: dict | None):
    self.leaf_index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    self.batch_size = batch_size
    self.perturbations = perturbations
    self.steps = steps or {}
    self.calls: list[Call] = []
    self.skipped: list[Skipped] = []
    self.last_dense_input: jax.Array | None = None
    self.trace = current_trace()  # a layer run under a JAX transformation inside the model sees another

  def visit(self, handler: Handler, module, layer_type: str, name: str, params: dict, call: Callable, x, kwargs) -> jax.Array:
    """Run the layer's own `call(x)` and tape it; or note why it cannot be taped and leave the output alone."""
    y = call(x)
    if handler.dense and current_trace() == self.trace:
      self.last_dense_input = x
    roles = tuple((role, self.leaf_index.get(id(params[role]))) for role in handler.roles if params.get(role) is not None)
    rows_fn, reason = handler.prepare(module, x)
    if current_trace() != self.trace:
      reason = "it runs under a JAX transformation inside the model (e.g. nn.scan, nn.remat, nn.vmap)"
    if reason is None and kwargs:
      reason = f"it was called with the options {sorted(kwargs)}"
    if reason is None and any(index is None for _, index in roles):
      reason = "its parameters are not leaves of the params passed to the model (made or changed inside it)"
    if reason is None and x.shape[0] != self.batch_size:
      reason = f"its input has leading axis {x.shape[0]}, not the batch of {self.batch_size}"
    if reason is not None:
      self.skip(name, layer_type, tuple(i for _, i in roles if i is not None), reason)
      return y
    info = LayerInfo(name, handler.kind, layer_type, roles)
    rows = rows_fn(x)
    self.calls.append(Call(info, jax.ShapeDtypeStruct(y.shape, y.dtype), rows))
    if info.leaves in self.steps:
      y = y + ghost.correction(info, rows, self.steps[info.leaves]).reshape(y.shape).astype(y.dtype)
    if self.perturbations is not None:
      y = y + self.perturbations[len(self.calls) - 1]
    return y

  def skip(self, name: str, layer_type: str, leaves: tuple[int, ...], reason: str) -> None:
    self.skipped.append(Skipped(name, layer_type, leaves, reason))

  def leaves_of(self, params: dict) -> tuple[int, ...]:
    return tuple(self.leaf_index[id(v)] for v in params.values() if v is not None and id(v) in self.leaf_index)


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("metasel_tape", default=None)


def _linen_interceptor(next_fun, args, kwargs, context):
  """Tape the `__call__` of supported linen layers; note any other method of theirs (e.g. `Embed.attend`)."""
  recorder = _ACTIVE.get()
  found = None if recorder is None else _handler_of(type(context.module), LINEN_HANDLERS)
  if found is None or context.method_name == "setup":
    return next_fun(*args, **kwargs)
  base, handler = found
  module = context.module
  params = dict(module.variables.get("params", {}))
  name = "/".join(str(p) for p in module.path) or type(module).__name__
  if context.method_name != "__call__" or len(args) != 1:
    recorder.skip(name, base.__name__, recorder.leaves_of(params), f"it is also used through {context.method_name}")
    return next_fun(*args, **kwargs)
  if type(module).__call__ is not base.__call__:
    reason = f"its class {type(module).__name__} replaces {base.__name__}.__call__ (e.g. nn.remat)"
    recorder.skip(name, base.__name__, recorder.leaves_of(params), reason)
    return next_fun(*args, **kwargs)
  return recorder.visit(handler, module, base.__name__, name, params, lambda x: next_fun(x, **kwargs), args[0], kwargs)


def _nnx_params(module) -> dict:
  """The arrays behind an NNX layer's parameters (None for an absent bias)."""
  out = {}
  for role in ("kernel", "bias", "embedding", "scale"):
    variable = getattr(module, role, None)
    out[role] = variable.get_value() if isinstance(variable, nnx.Variable) else None
  return out


_TAPED_CLASSES: dict[type, type] = {}


def _taped_class(cls: type, base: type, handler: Handler) -> type:
  """A subclass of the NNX layer class `cls` whose `__call__` reports to the active tape."""
  if cls not in _TAPED_CLASSES:

    def __call__(self, x, *args, **kwargs):
      recorder = _ACTIVE.get()
      call = lambda v: cls.__call__(self, v, *args, **kwargs)  # noqa: E731
      if recorder is None:
        return call(x)
      options = dict(kwargs, **{f"arg{i}": a for i, a in enumerate(args)})
      return recorder.visit(handler, self, f"nnx.{base.__name__}", self._metasel_name, _nnx_params(self), call, x, options)

    def attend(self, *args, **kwargs):
      recorder = _ACTIVE.get()
      if recorder is not None:
        recorder.skip(self._metasel_name, f"nnx.{base.__name__}", recorder.leaves_of(_nnx_params(self)),
                      "it is also used through attend")
      return cls.attend(self, *args, **kwargs)

    members = {"__call__": __call__, **({"attend": attend} if hasattr(cls, "attend") else {})}
    _TAPED_CLASSES[cls] = type(f"Taped{cls.__name__}", (cls,), members)
  return _TAPED_CLASSES[cls]


def hook_nnx(module: nnx.Module) -> None:
  """Let the supported layers of a merged NNX module report to the active tape (nothing when none is active).

  Called by the NNX `Model` on its freshly merged copy, never on the user's module.
  """
  if _ACTIVE.get() is None:
    return
  for path, node in nnx.iter_graph(module):
    found = _handler_of(type(node), NNX_HANDLERS) if isinstance(node, nnx.Module) else None
    if found is not None and type(node).__call__ is found[0].__call__:
      node.__class__ = _taped_class(type(node), *found)
      object.__setattr__(node, "_metasel_name", "/".join(str(p) for p in path) or type(module).__name__)


@contextlib.contextmanager
def _recording(recorder: _Recorder):
  token = _ACTIVE.set(recorder)
  try:
    with nn.intercept_methods(_linen_interceptor):
      yield recorder
  finally:
    _ACTIVE.reset(token)


# ----------------------------------------------------------------------------------------------------
# Taped passes.


def forward(model: Model, params, x: jax.Array, *, perturbations: dict | None = None, steps: dict | None = None) -> Forward:
  """Run `model` on x (B, ...) taping every supported layer; returns outputs, embeddings and the calls.

  `perturbations` ({call index: array of the call's output shape}, from `zero_perturbations`) are added
  to the layers' outputs, so that their gradients are the loss-to-output gradients. `steps` ({layer
  leaves: `ghost.step_factors` of one sample}) changes those layers' parameters by that sample's step,
  without forming it. When the model returns logits only, the embedding is the input of its last dense
  layer, flattened to (B, D).
  """
  batch = x.shape[0]
  with _recording(_Recorder(params, batch, perturbations, steps)) as recorder:
    raw = model.apply(params, x)
  outputs, embeddings = split_outputs(raw, batch)
  if embeddings is None and recorder.last_dense_input is not None and recorder.last_dense_input.shape[0] == batch:
    embeddings = recorder.last_dense_input.reshape(batch, -1)
  return Forward(outputs, embeddings, tuple(recorder.calls), tuple(recorder.skipped))


def zero_perturbations(model: Model, params, x: jax.Array) -> dict[int, jax.Array]:
  """Zeros shaped like every taped call's output for this batch ({} when nothing is taped)."""
  shapes = jax.eval_shape(lambda p, v: forward(model, p, v), params, x)
  return {i: jnp.zeros(call.output.shape, call.output.dtype) for i, call in enumerate(shapes.calls)}


def joined_calls(calls: tuple[Call, ...]) -> list[list[int]]:
  """The call indices of each layer (calls that own the same parameter leaves), in order of first call."""
  grouped: dict[tuple[int, ...], list[int]] = {}
  for index, call in enumerate(calls):
    grouped.setdefault(call.info.leaves, []).append(index)
  return list(grouped.values())


def layer_rows(fwd: Forward) -> tuple[tuple[LayerInfo, jax.Array], ...]:
  """Each taped layer's input rows (B, T, in), calls of a layer joined along the positions, as in `assemble`."""
  return tuple(
      (fwd.calls[group[0]].info, jnp.concatenate([fwd.calls[i].rows for i in group], axis=1))
      for group in joined_calls(fwd.calls)
  )


def assemble(fwd: Forward, output_grads: dict[int, jax.Array], losses: jax.Array) -> Tape:
  """A `Tape` from a taped forward pass and the gradients of its perturbations, calls of a layer joined."""
  layers = []
  for (info, rows), group in zip(layer_rows(fwd), joined_calls(fwd.calls)):
    grads = [output_grads[i].reshape(rows.shape[0], fwd.calls[i].rows.shape[1], -1) for i in group]  # (B, T, out)
    layers.append(LayerTape(info, rows, jnp.concatenate(grads, axis=1)))
  return Tape(losses, fwd.outputs, fwd.embeddings, tuple(layers), fwd.skipped)
