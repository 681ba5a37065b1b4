"""The ghost algebra: per-sample gradient norms, dot products and steps from a layer's tape, never forming B x P.

Three kinds of layer cover the standard Flax layers (`metasel.tape` decides which layer is which):

* "dense" (Dense, DenseGeneral, Conv over its patches, nnx.Linear, nnx.Conv): per-sample input rows
  a_{i,t} (B, T, in) and loss-to-output gradients d_{i,t} (B, T, out); the sample's kernel gradient is
  sum_t a_t d_t^T and its bias gradient sum_t d_t. Norms use the cheaper of the Gram form
  sum_{t,s} <a_t, a_s><d_t, d_s> (T x T per sample) and the formed (in, out) layer gradient.
* "embed" (Embed, nnx.Embed): token ids (B, T) and output gradients (B, T, dim); the sample's table
  gradient adds d_t to the row of id_t, so tokens of a sample that share an id add up.
* "norm" (LayerNorm, RMSNorm and their NNX twins): the normalised input x_hat (B, T, D) and output
  gradients (B, T, D); the sample's scale gradient is sum_t x_hat_t * d_t and its bias gradient sum_t d_t.
* "tied" (an Embed also used through `attend`, as a tied LM head): the lookup's ids (B, T) and gradients
  d (B, T, dim), and the head's inputs h (B, S, dim) and logit gradients g (B, S, V); the sample's table
  gradient is the sum of both uses, sum_t e_{id_t} d_t^T + sum_s g_s h_s^T, and norms and dots include
  the cross terms sum_{t,s} g_s[id_t] <d_t, h_s>. Its rows are (ids, h), its grads (d, g).

A call of `attend` alone is recorded with kind "attend" (rows h, output g); `metasel.tape` joins a
table's lookups and attends into one "tied" layer.

A `LayerTape` holds one layer's rows and gradients and which parameter leaves ("roles") it owns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import struct

__all__ = [
    "LayerInfo", "LayerTape", "sq_norms", "dots", "cross_dots", "summed_grads", "step_factors", "correction",
    "layer_grads", "TiedFactors",
]

DENSE, EMBED, NORM, TIED, ATTEND = "dense", "embed", "norm", "tied", "attend"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What a taped layer is: its name, kind, class and the parameter leaves it owns.

  Attributes:
    name: the layer's path in the model, e.g. "Dense_0" or "blocks/0/mlp".
    kind: "dense", "embed", "norm" or "tied" ("attend" for one call of `Embed.attend`).
    layer_type: its class, e.g. "Dense" or "nnx.Linear".
    roles: (role, leaf index) pairs: "kernel" / "bias", "embedding", or "scale" / "bias"; the index is the
      leaf's position in `jax.tree.leaves(params)`.
  """

  name: str
  kind: str
  layer_type: str
  roles: tuple[tuple[str, int], ...]

  def leaf(self, role: str) -> int | None:
    return dict(self.roles).get(role)

  @property
  def leaves(self) -> tuple[int, ...]:
    return tuple(index for _, index in self.roles)


@struct.dataclass
class LayerTape:
  """One layer's per-sample record: rows (B, T, in) (ids (B, T) for "embed") and output gradients (B, T, out).

  A "tied" layer holds pairs: rows (ids (B, T), h (B, S, dim)) and grads (d (B, T, dim), g (B, S, V)).
  """

  info: LayerInfo = struct.field(pytree_node=False)
  rows: Any
  grads: Any

  @property
  def batch(self) -> int:
    """The number of samples on the tape."""
    return jax.tree.leaves(self.rows)[0].shape[0]


class TiedFactors(NamedTuple):
  """One sample's step of a tied table in factored form: (ids, d) of its lookups and (h, g) of its head."""

  lookup: tuple[jax.Array, jax.Array]
  attend: tuple[jax.Array, jax.Array]


def _gram_is_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
  """Per sample, T x T Gram products cost T^2 (in + out); forming the layer gradient costs T in out."""
  return positions * positions * (fan_in + fan_out) <= positions * fan_in * fan_out


def _dense_kernel_sq_norms(a: jax.Array, d: jax.Array) -> jax.Array:
  """||sum_t a_t d_t^T||_F^2 per sample (B,), by the cheaper of the Gram form and the formed gradient."""
  positions, fan_in, fan_out = a.shape[1], a.shape[2], d.shape[2]
  if positions == 1:
    return jnp.sum(jnp.square(a[:, 0]), -1) * jnp.sum(jnp.square(d[:, 0]), -1)
  if _gram_is_cheaper(positions, fan_in, fan_out):
    return jnp.sum(jnp.einsum("bti,bsi->bts", a, a) * jnp.einsum("bto,bso->bts", d, d), axis=(1, 2))
  return jnp.sum(jnp.square(jnp.einsum("bti,bto->bio", a, d)), axis=(1, 2))


def _id_groups(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per sample, the positions sorted by id and a group number per sorted position (equal ids, one group)."""
  order = jnp.argsort(ids, axis=1)
  sorted_ids = jnp.take_along_axis(ids, order, axis=1)
  new = jnp.concatenate([jnp.ones_like(sorted_ids[:, :1], bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1)
  return order, jnp.cumsum(new, axis=1) - 1


def _embed_sq_norms(ids: jax.Array, d: jax.Array) -> jax.Array:
  """||table gradient||^2 per sample: the rows of equal ids summed first (segment sums), then squared."""
  order, group = _id_groups(ids)
  sorted_d = jnp.take_along_axis(d, order[..., None], axis=1)  # (B, T, dim)
  positions = ids.shape[1]
  summed = jax.vmap(lambda g, v: jax.ops.segment_sum(v, g, num_segments=positions, indices_are_sorted=True))(
      group, sorted_d
  )
  return jnp.sum(jnp.square(summed), axis=(1, 2))


def _norm_grads(layer: LayerTape) -> dict[str, jax.Array]:
  """Per-sample scale and bias gradients (B, D) of a normalisation layer."""
  out = {}
  if layer.info.leaf("scale") is not None:
    out["scale"] = jnp.sum(layer.rows * layer.grads, axis=1)
  if layer.info.leaf("bias") is not None:
    out["bias"] = jnp.sum(layer.grads, axis=1)
  return out


def _table_parts(layer: LayerTape) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
  """(ids, d, h, g) of an "embed" or "tied" layer; the head's h and g are None for a lookup alone."""
  if layer.info.kind == TIED:
    (ids, h), (d, g) = layer.rows, layer.grads
    return ids, d, h, g
  return layer.rows, layer.grads, None, None


def _check_layer(layer: LayerTape) -> None:
  """The tape's invariant: rows and gradients agree on the batch and the positions."""
  if layer.info.kind == TIED:
    ids, d, h, g = _table_parts(layer)
    chex.assert_rank((ids, h, d, g), (2, 3, 3, 3))
    chex.assert_equal_shape_prefix((ids, d), 2)
    chex.assert_equal_shape_prefix((h, g), 2)
    return
  chex.assert_rank(layer.grads, 3)
  chex.assert_rank(layer.rows, 2 if layer.info.kind == EMBED else 3)
  chex.assert_equal_shape_prefix((layer.rows, layer.grads), 2)


def sq_norms(layer: LayerTape) -> jax.Array:
  """Each sample's squared gradient norm (B,) over all of the layer's parameters."""
  _check_layer(layer)
  kind = layer.info.kind
  if kind == NORM:
    return sum(jnp.sum(jnp.square(g), axis=-1) for g in _norm_grads(layer).values())
  if kind == EMBED:
    return _embed_sq_norms(layer.rows, layer.grads)
  if kind == TIED:
    ids, d, h, g = _table_parts(layer)
    lookup_head = jnp.sum(jnp.take_along_axis(g, ids[:, None, :], axis=2) * jnp.einsum("btd,bsd->bst", d, h), axis=(1, 2))
    return _embed_sq_norms(ids, d) + _dense_kernel_sq_norms(h, g) + 2 * lookup_head
  total = _dense_kernel_sq_norms(layer.rows, layer.grads)
  if layer.info.leaf("bias") is not None:
    total = total + jnp.sum(jnp.square(jnp.sum(layer.grads, axis=1)), axis=-1)
  return total


def dots(layer: LayerTape, reference: dict[str, jax.Array]) -> jax.Array:
  """Each sample's gradient dotted with a reference gradient of the layer's parameters (role -> array), (B,)."""
  _check_layer(layer)
  kind = layer.info.kind
  if kind == NORM:
    return sum(g @ reference[role].reshape(-1) for role, g in _norm_grads(layer).items())
  if kind == EMBED:
    return jnp.sum(reference["embedding"][layer.rows] * layer.grads, axis=(1, 2))
  if kind == TIED:
    (ids, d, h, g), table = _table_parts(layer), reference["embedding"]  # table (V, dim)
    return jnp.sum(table[ids] * d, axis=(1, 2)) + jnp.sum((g @ table) * h, axis=(1, 2))
  kernel = reference["kernel"].reshape(layer.rows.shape[-1], -1)  # (in, out)
  total = jnp.sum((layer.rows @ kernel) * layer.grads, axis=(1, 2))
  if layer.info.leaf("bias") is not None:
    total = total + jnp.sum(layer.grads, axis=1) @ reference["bias"].reshape(-1)
  return total


def _dense_cross(a: jax.Array, d: jax.Array, a2: jax.Array, d2: jax.Array) -> jax.Array:
  """<sum_t a_t d_t^T, sum_s a'_s d'_s^T> for every pair (B, C), by the cheaper of the Gram and formed forms."""
  (batch, positions, fan_in), fan_out = a.shape, d.shape[2]
  other, other_positions = a2.shape[0], a2.shape[1]
  if positions == 1 and other_positions == 1:
    return (a[:, 0] @ a2[:, 0].T) * (d[:, 0] @ d2[:, 0].T)
  gram = batch * other * positions * other_positions * (fan_in + fan_out)
  formed = (batch * positions + other * other_positions + batch * other) * fan_in * fan_out
  if gram <= formed:
    return jnp.einsum("bcts,bcts->bc", jnp.einsum("bti,csi->bcts", a, a2), jnp.einsum("bto,cso->bcts", d, d2))
  g, g2 = jnp.einsum("bti,bto->bio", a, d), jnp.einsum("bti,bto->bio", a2, d2)
  return g.reshape(batch, -1) @ g2.reshape(other, -1).T


def _embed_cross(ids: jax.Array, d: jax.Array, ids2: jax.Array, d2: jax.Array) -> jax.Array:
  """Table-gradient dot products (B, C): sum over position pairs with equal ids of <d_t, d'_s>."""
  same = ids[:, None, :, None] == ids2[None, :, None, :]  # (B, C, T, S)
  return jnp.sum(jnp.where(same, jnp.einsum("btd,csd->bcts", d, d2), 0.0), axis=(2, 3))


def _tied_cross(layer: LayerTape, other: LayerTape) -> jax.Array:
  """Tied-table gradient dot products (B, C): lookup-lookup, head-head and both lookup-head cross terms."""
  ids, d, h, g = _table_parts(layer)
  ids2, d2, h2, g2 = _table_parts(other)
  lookup_head = jnp.einsum("csbt,bcts->bc", jnp.take(g2, ids, axis=2), jnp.einsum("btd,csd->bcts", d, h2))
  head_lookup = jnp.einsum("bsct,bcst->bc", jnp.take(g, ids2, axis=2), jnp.einsum("bsd,ctd->bcst", h, d2))
  return _embed_cross(ids, d, ids2, d2) + _dense_cross(h, g, h2, g2) + lookup_head + head_lookup


def cross_dots(layer: LayerTape, other: LayerTape) -> jax.Array:
  """Dot products (B, C) of every sample's gradient in `layer` with every sample's gradient in `other`.

  Both are tapes of the same layer (e.g. of a training and a validation batch); nothing of size
  (B x P) is formed unless forming the per-sample layer gradients is the cheaper way.
  """
  _check_layer(layer)
  _check_layer(other)
  if layer.info != other.info:
    raise ValueError(f"cross_dots needs two tapes of one layer, got {layer.info.name} and {other.info.name}")
  kind = layer.info.kind
  if kind == NORM:
    mine, theirs = _norm_grads(layer), _norm_grads(other)
    return sum(mine[role] @ theirs[role].T for role in mine)
  if kind == EMBED:
    return _embed_cross(layer.rows, layer.grads, other.rows, other.grads)
  if kind == TIED:
    return _tied_cross(layer, other)
  total = _dense_cross(layer.rows, layer.grads, other.rows, other.grads)
  if layer.info.leaf("bias") is not None:
    total = total + jnp.sum(layer.grads, axis=1) @ jnp.sum(other.grads, axis=1).T
  return total


def summed_grads(layer: LayerTape, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """The layer's gradient summed over the batch (role -> array of the parameter's shape), from the tape."""
  _check_layer(layer)
  kind = layer.info.kind
  if kind == NORM:
    grads = {role: jnp.sum(g, axis=0) for role, g in _norm_grads(layer).items()}
  elif kind in (EMBED, TIED):
    ids, d, h, g = _table_parts(layer)
    table = jnp.zeros((shapes["embedding"][0], d.shape[-1]), d.dtype).at[ids.reshape(-1)].add(d.reshape(-1, d.shape[-1]))
    grads = {"embedding": table if g is None else table + jnp.einsum("bsv,bsd->vd", g, h)}
  else:
    grads = {"kernel": jnp.einsum("bti,bto->io", layer.rows, layer.grads)}
    if layer.info.leaf("bias") is not None:
      grads["bias"] = jnp.sum(layer.grads, axis=(0, 1))
  return {role: g.reshape(shapes[role]) for role, g in grads.items()}


def layer_grads(layer: LayerTape, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """Each sample's full gradient of every parameter of the layer (role -> (B, *shape)): for checks, not hot paths."""
  kind, batch = layer.info.kind, layer.batch
  if kind == NORM:
    grads = _norm_grads(layer)
  elif kind in (EMBED, TIED):
    ids, d, h, g = _table_parts(layer)
    onehot = jax.nn.one_hot(ids, shapes["embedding"][0], dtype=d.dtype)  # (B, T, V)
    table = jnp.einsum("btv,btd->bvd", onehot, d)
    grads = {"embedding": table if g is None else table + jnp.einsum("bsv,bsd->bvd", g, h)}
  else:
    grads = {"kernel": jnp.einsum("bti,bto->bio", layer.rows, layer.grads)}
    if layer.info.leaf("bias") is not None:
      grads["bias"] = jnp.sum(layer.grads, axis=1)
  return {role: g.reshape(batch, *shapes[role]) for role, g in grads.items()}


def step_factors(layer: LayerTape, scale: jax.Array | float):
  """Each sample's gradient times `scale`, in factored form with a leading batch axis, for `correction`.

  "dense": (rows (B, T, in), scale * grads (B, T, out)); "embed": (ids (B, T), scale * grads);
  "norm": the formed per-sample gradients times `scale`, a dict role -> (B, D); "tied": `TiedFactors`.
  """
  _check_layer(layer)
  if layer.info.kind == NORM:
    return {role: scale * g for role, g in _norm_grads(layer).items()}
  if layer.info.kind == TIED:
    ids, d, h, g = _table_parts(layer)
    return TiedFactors((ids, scale * d), (h, scale * g))
  return layer.rows, scale * layer.grads


def correction(info: LayerInfo, rows: jax.Array, factors) -> jax.Array:
  """The change of a layer's output rows (B, T, out) on inputs `rows` when one sample's `factors` are added.

  Layers are linear in their parameters, so stepping the parameters by delta changes the output by the
  layer applied with delta alone. "dense" picks the cheaper of the low-rank product (x A^T) D and forming
  delta = A^T D; "embed" adds the step's rows of the ids that occur; "norm" x_hat * d_scale + d_bias.
  A tied table's step (`TiedFactors`) changes both its lookups ("embed" calls) and its head ("attend").
  """
  if isinstance(factors, TiedFactors):
    return _tied_correction(info, rows, factors)
  if info.kind == NORM:
    out = jnp.zeros_like(rows)
    if "scale" in factors:
      out = out + rows * factors["scale"]
    return out + factors["bias"] if "bias" in factors else out
  a, d = factors
  if info.kind == EMBED:
    return (rows[..., None] == a).astype(d.dtype) @ d  # (B, T, T') @ (T', dim)
  batch_rows = rows.shape[0] * rows.shape[1]
  positions, fan_in, fan_out = a.shape[0], a.shape[1], d.shape[1]
  if batch_rows * positions * (fan_in + fan_out) <= fan_in * fan_out * (positions + batch_rows):
    out = (rows @ a.T) @ d
  else:
    out = rows @ (a.T @ d)
  if info.leaf("bias") is not None:
    out = out + jnp.sum(d, axis=0)
  return out


def _tied_correction(info: LayerInfo, rows: jax.Array, factors: TiedFactors) -> jax.Array:
  """Output change of one call of a tied table stepped by delta = sum_t e_{id_t} d_t^T + sum_s g_s h_s^T (V, dim)."""
  (ids, d), (h, g) = factors  # ids (T,), d (T, dim), h (S, dim), g (S, V)
  if info.kind == EMBED:  # rows: ids (B, T'); delta[rows] (B, T', dim)
    lookup = (rows[..., None] == ids).astype(d.dtype) @ d
    return lookup + jnp.einsum("sbt,sd->btd", jnp.take(g, rows, axis=1), h)
  # attend: rows x (B, T', dim); x @ delta^T (B, T', V)
  onehot = jax.nn.one_hot(ids, g.shape[-1], dtype=d.dtype)  # (T, V)
  return (rows @ d.T) @ onehot + (rows @ h.T) @ g
