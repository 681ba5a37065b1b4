"""How the tape reads each supported Flax layer class: its kind, its parameter roles and its input rows.

A `Handler` says which `metasel.ghost` kind a layer is, which parameters it owns, and, for one call,
either the function giving the input rows that kind needs or why this call cannot be taped (its
settings, its input's shape). `metasel.tape` looks handlers up by class (`handler_of`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metasel.ghost import ATTEND, DENSE, EMBED, NORM

__all__ = ["Handler", "LINEN_HANDLERS", "NNX_HANDLERS", "ATTEND_HANDLER", "SUPPORTED", "handler_of", "conv_patches"]


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


def _attend_prepare(module, x):
  if x.ndim < 2:
    return None, f"its query has shape {x.shape}, with no batch axis before the features"
  return (lambda v: _batch_rows(v, v.shape[-1])), None


def _norm_prepare(centred: bool):
  def prepare(module, x):
    reason = _norm_reason(module, x)
    return (None, reason) if reason else ((lambda v: _batch_rows(_standardised(module, v, centred), v.shape[-1])), None)

  return prepare


_DENSE = Handler(DENSE, ("kernel", "bias"), _dense_prepare, dense=True)
_GENERAL = Handler(DENSE, ("kernel", "bias"), _general_prepare, dense=True)
_CONV = Handler(DENSE, ("kernel", "bias"), _conv_prepare)
_EMBED = Handler(EMBED, ("embedding",), _embed_prepare)
ATTEND_HANDLER = Handler(ATTEND, ("embedding",), _attend_prepare, dense=True)  # Embed.attend: a head on the table
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


def handler_of(cls: type, handlers: dict[type, Handler]) -> tuple[type, Handler] | None:
  """The supported base class of `cls` and its handler (whether or not `cls` keeps the base's `__call__`)."""
  for base in cls.__mro__:
    if base in handlers:
      return base, handlers[base]
  return None
