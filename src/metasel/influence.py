"""Online influence of training samples on a validation batch, from the tape a training step records.

For training sample i, validation batch V (|V| = m), dense layers l with input rows a^l and
loss-to-output gradients d^l, and g = d loss / d logits:

* **ghost influence** (first-order In-Run Data Shapley, "TracIn-ideal"): the exact
  <grad l_i, grad L_V> = (1/m) sum_j sum_l <a_i^l, a_j^l> <d_i^l, d_j^l> (+ bias, embedding and norm
  terms), summed over every taped layer by ghost dot products (`metasel.ghost`). Needs the training
  step's backward pass to the layer outputs and one of the validation batch.
* **layer-aware influence (LAI)**: (1/m) sum_j <g_i, g_j> sum_{l in L} <a~_i^l, a~_j^l>, where every
  layer's output gradient is replaced by the one logit gradient, so it needs forward passes only. a~^l
  is the layer's input summed over positions, with the constant its bias sees (the number of positions)
  appended for a layer with a bias: then LAI over the last layer alone is that layer's exact ghost term.
  Three forms: "pairwise" (the m x B products), "outer" (the same numbers through the mean validation
  outer product M^l = (1/m) sum_j g_j a~_j^T, LAI_i = sum_l g_i^T M^l a~_i) and "means", the authors'
  cheaper variant (g_i . mean_V g) sum_l (a~_i . mean_V a~), which is not equal to the others unless m = 1.
* **GREATS**: greedy batch selection from scores s_i = eta <g_i, g_V> and interactions
  M_ij = eta^2 <g_i, g_j>: pick argmax s, subtract M[picked], repeat to k.

The tape functions are pure; `Scorer`s (`ghost_scorer`, `lai_scorer`) compute them from a model's params
and batches, reusing the training step's tape when given one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, ghost, persample
from metasel import tape as tape_lib
from metasel.adapters import ModelLike
from metasel.ghost import DENSE, LayerInfo, LayerTape
from metasel.records import valued

__all__ = [
    "LaiForm", "LayerSet", "LAI_FORMS", "Activations", "logit_grads", "activations", "dense_layer_names",
    "select_layers", "ghost_pairwise", "ghost_influence", "lai_pairwise", "lai", "greats", "Scorer",
    "ghost_scorer", "lai_scorer",
]

Params = Any
LaiForm = Literal["pairwise", "outer", "means"]
LAI_FORMS = ("pairwise", "outer", "means")
LayerSet = str | Sequence[str]  # "all", "last", or layer names such as ("Dense_1", "Dense_2")
Activations = tuple[tuple[LayerInfo, jax.Array], ...]  # (layer, input rows (B, T, in)) per dense layer


def logit_grads(loss_fn: persample.LossFn, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Each sample's loss gradient with respect to its own outputs (B, O): softmax - onehot for cross-entropy."""
  return jax.grad(lambda o: jnp.sum(loss_fn(o, targets)))(outputs)


def activations(record: tape_lib.Tape | tape_lib.Forward) -> Activations:
  """The dense layers' input rows of a tape or a taped forward pass, calls of a layer joined, in call order."""
  if isinstance(record, tape_lib.Tape):
    return tuple((layer.info, layer.rows) for layer in record.layers if layer.info.kind == DENSE)
  return tuple((info, rows) for info, rows in tape_lib.layer_rows(record) if info.kind == DENSE)


def dense_layer_names(record: tape_lib.Tape | tape_lib.Forward) -> tuple[str, ...]:
  """Names of the taped dense layers (Dense, DenseGeneral, Conv and NNX twins), in call order."""
  return tuple(info.name for info, _ in activations(record))


def select_layers(acts: Activations, layers: LayerSet) -> Activations:
  """The activations of the layer set: "all", "last" (the last dense layer called) or a sequence of names."""
  names = tuple(info.name for info, _ in acts)
  if not names:
    raise ValueError("the model has no taped dense layer, so layer-aware influence has no activations to use")
  if isinstance(layers, str) and layers in ("all", "last"):
    return acts if layers == "all" else acts[-1:]
  wanted = (layers,) if isinstance(layers, str) else tuple(layers)
  if not wanted:
    raise ValueError(f"the layer set is empty; expected 'all', 'last' or some of the taped dense layers {list(names)}")
  unknown = [name for name in wanted if name not in names]
  if unknown:
    raise ValueError(
        f"layer set {list(wanted)} names layers the model does not have ({unknown}); expected 'all', 'last'"
        f" or names of its taped dense layers: {list(names)}"
    )
  return tuple(pair for pair in acts if pair[0].name in wanted)


# ----------------------------------------------------------------------------------------------------
# Ghost influence


def _matching(layer: LayerTape, others: dict[LayerInfo, LayerTape]) -> LayerTape:
  if layer.info not in others:
    raise ValueError(f"layer {layer.info.name} is taped in one batch but not in the other; tape both with one model")
  return others[layer.info]


def ghost_pairwise(tape: tape_lib.Tape, other: tape_lib.Tape) -> jax.Array:
  """<grad l_i, grad l_j> (B, C) for every sample i of `tape` and j of `other`, over their fully taped layers."""
  others = {layer.info: layer for layer in other.ghost_layers}
  zeros = jnp.zeros((tape.losses.shape[0], other.losses.shape[0]), jnp.float32)  # (B, C) with no taped layer too
  return sum((ghost.cross_dots(layer, _matching(layer, others)) for layer in tape.ghost_layers), zeros)


def _mean_dots(layer: LayerTape, other: LayerTape, shapes: dict[str, tuple[int, ...]]) -> jax.Array:
  """(1/C) sum_j <grad_i, grad_j> over one layer (B,): pairwise for single-position dense layers, where it
  costs B C (in + out) against (B + C) in out for forming the mean gradient; through that mean otherwise."""
  count = other.batch
  if layer.info.kind == DENSE and layer.rows.shape[1] == 1 and other.rows.shape[1] == 1:
    batch, fan_in, fan_out = layer.rows.shape[0], layer.rows.shape[2], layer.grads.shape[-1]
    if batch * count * (fan_in + fan_out) <= (batch + count) * fan_in * fan_out:
      return jnp.mean(ghost.cross_dots(layer, other), axis=1)
  mean = {role: g / count for role, g in ghost.summed_grads(other, shapes).items()}
  return ghost.dots(layer, mean)


def ghost_influence(tape: tape_lib.Tape, val_tape: tape_lib.Tape, params: Params) -> jax.Array:
  """Ghost influence (B,): <grad l_i, grad L_V> over the fully taped layers of `tape`, V being `val_tape`'s batch.

  Both tapes are `persample.record`s (or the training step's tape) of one model at `params`; parameters
  no layer tapes are not included here (`ghost_scorer` adds them by `vmap`).
  """
  leaves = jax.tree.leaves(params)
  others = {layer.info: layer for layer in val_tape.ghost_layers}
  total = jnp.zeros(tape.losses.shape[0], jnp.float32)
  for layer in tape.ghost_layers:
    shapes = {role: jnp.shape(leaves[index]) for role, index in layer.info.roles}
    total = total + _mean_dots(layer, _matching(layer, others), shapes)
  return total


# ----------------------------------------------------------------------------------------------------
# Layer-aware influence


def _pooled(info: LayerInfo, rows: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """a~ in two parts: the rows summed over positions (B, in), and the bias's input, the position count
  (a scalar), or None for a layer without a bias; kept apart so the wide rows are never copied."""
  return jnp.sum(rows, axis=1), (None if info.leaf("bias") is None else jnp.float32(rows.shape[1]))


def _similarity(info: LayerInfo, a: jax.Array, b: jax.Array) -> jax.Array:
  """<a~_i, a~_j> (B, C) of one layer's rows a (B, T, in) and b (C, S, in)."""
  (sum_a, count_a), (sum_b, count_b) = _pooled(info, a), _pooled(info, b)
  products = sum_a @ sum_b.T
  return products if count_a is None else products + count_a * count_b


def _check_pairs(acts: Activations, val_acts: Activations) -> None:
  if tuple(info for info, _ in acts) != tuple(info for info, _ in val_acts):
    raise ValueError(
        f"the two batches' layer sets differ: {[i.name for i, _ in acts]} and {[i.name for i, _ in val_acts]};"
        " select the same layers of one model for both"
    )


def lai_pairwise(acts: Activations, g: jax.Array, val_acts: Activations, val_g: jax.Array) -> jax.Array:
  """<g_i, g_j> sum_l <a~_i^l, a~_j^l> (B, C) for every training sample i and validation sample j."""
  _check_pairs(acts, val_acts)
  similarity = sum(_similarity(info, a, b) for (info, a), (_, b) in zip(acts, val_acts))
  return (g @ val_g.T) * similarity


def _lai_outer(info: LayerInfo, a: jax.Array, g: jax.Array, b: jax.Array, val_g: jax.Array) -> jax.Array:
  """One layer's g_i^T M a~_i (B,) with M = (1/m) sum_j g_j a~_j^T, the bias column handled apart."""
  (sum_a, count_a), (sum_b, count_b) = _pooled(info, a), _pooled(info, b)
  outer = sum_b.T @ val_g / val_g.shape[0]  # (in, O)
  total = jnp.sum((sum_a @ outer) * g, axis=1)
  if count_a is None:
    return total
  return total + count_a * count_b * (g @ jnp.mean(val_g, axis=0))


def lai(acts: Activations, g: jax.Array, val_acts: Activations, val_g: jax.Array, *, form: LaiForm = "outer") -> jax.Array:
  """Layer-aware influence (B,) of each training sample on the validation batch, in one of `LAI_FORMS`.

  `acts` / `val_acts` are the selected layers' `activations` (`select_layers`) of the training and
  validation batches, `g` (B, O) / `val_g` (m, O) their `logit_grads`. Pass the training batch as both
  for self-influence. "outer" (the default) gives the "pairwise" numbers at O(B in O) per layer instead of
  O(B m in), which is less whenever the outputs O are fewer than the validation batch.
  """
  if form not in LAI_FORMS:
    raise ValueError(f"LAI form must be one of {LAI_FORMS}, got {form!r}")
  _check_pairs(acts, val_acts)
  if form == "pairwise":
    return jnp.mean(lai_pairwise(acts, g, val_acts, val_g), axis=1)
  if form == "outer":
    return sum(_lai_outer(info, a, g, b, val_g) for (info, a), (_, b) in zip(acts, val_acts))
  similarity = 0.0
  for (info, a), (_, b) in zip(acts, val_acts):
    (sum_a, count_a), (sum_b, count_b) = _pooled(info, a), _pooled(info, b)
    similarity = similarity + sum_a @ jnp.mean(sum_b, axis=0) + (0.0 if count_a is None else count_a * count_b)
  return (g @ jnp.mean(val_g, axis=0)) * similarity


# ----------------------------------------------------------------------------------------------------
# GREATS


def greats(scores: jax.Array, interactions: jax.Array, k: int, step_size: float | jax.Array) -> jax.Array:
  """GREATS greedy selection: a mask (B,) of the k samples picked from s = eta * scores, M = eta^2 * interactions.

  Each round picks the sample of highest s not yet picked, then lowers every s by that sample's row of
  M (the first-order loss change the picked sample already provides).
  """
  batch = scores.shape[0]
  checks.check_int("k", k, minimum=1, maximum=batch)
  if jnp.shape(interactions) != (batch, batch):
    raise ValueError(f"interactions must have shape ({batch}, {batch}), got {jnp.shape(interactions)}")

  lowest = jnp.finfo(jnp.float32).min  # below every finite score, above a picked sample's -inf

  def pick(_, carry):
    s, picked = carry
    chosen = jnp.argmax(jnp.where(picked, -jnp.inf, jnp.nan_to_num(s, nan=lowest, neginf=lowest)))
    return s - step_size * step_size * interactions[chosen], picked.at[chosen].set(True)

  _, picked = jax.lax.fori_loop(0, k, pick, (step_size * scores, jnp.zeros(batch, bool)))
  return picked


# ----------------------------------------------------------------------------------------------------
# Scorers: the tape functions on a model's batches


class Scorer(NamedTuple):
  """A per-sample influence score on a model, as pure functions (jit the caller).

  Attributes:
    name: label for logs, e.g. "ghost" or "lai".
    scores: `(params, x, y, val_x, val_y, tape=None) -> (B,)`: each training sample's influence on the
      validation batch; `tape` is a `persample.record` of (x, y) at params to reuse (the training step's).
    interactions: `(params, x, y, tape=None) -> (B, B)`: the same quantity between training samples
      (for GREATS).
  """

  name: str
  scores: Callable[..., jax.Array]
  interactions: Callable[..., jax.Array]


def _check_val(x: jax.Array, val_x: jax.Array) -> None:
  if jnp.shape(val_x)[1:] != jnp.shape(x)[1:]:
    raise ValueError(
        f"the validation batch has samples of shape {jnp.shape(val_x)[1:]}, the training batch"
        f" {jnp.shape(x)[1:]}; expected validation samples shaped like the training samples"
    )


@valued
def ghost_scorer(model: ModelLike, loss_fn: persample.LossFn) -> Scorer:
  """Exact ghost influence <grad l_i, grad L_V> and interactions <grad l_i, grad l_j> on any model.

  Taped layers by ghost dot products; parameters no layer tapes by `vmap` per-sample gradients (with the
  same warning as `persample` when they are a sizeable share of the model).
  """
  record = lambda params, x, y: persample.record(model, params, x, y, loss_fn)  # noqa: E731

  def scores(params, x, y, val_x, val_y, tape=None):
    _check_val(x, val_x)
    recorded = record(params, x, y) if tape is None else tape
    val_tape = record(params, val_x, val_y)
    total = ghost_influence(recorded, val_tape, params)
    other = persample.fallback_leaves(model, params, recorded)
    if other:
      val_mean = jnp.mean(persample.flat_grads(model, params, val_x, val_y, loss_fn, other), axis=0)
      total = total + persample.flat_grads(model, params, x, y, loss_fn, other) @ val_mean
    return total

  def interactions(params, x, y, tape=None):
    recorded = record(params, x, y) if tape is None else tape
    total = ghost_pairwise(recorded, recorded)
    other = persample.fallback_leaves(model, params, recorded)
    if other:
      flat = persample.flat_grads(model, params, x, y, loss_fn, other)
      total = total + flat @ flat.T
    return total

  return Scorer("ghost", scores, interactions)


@valued
def lai_scorer(
    model: ModelLike,
    loss_fn: persample.LossFn,
    *,
    layers: LayerSet = "all",
    form: LaiForm = "outer",
    reference: Literal["validation", "batch"] = "validation",
) -> Scorer:
  """Layer-aware influence on any model: forward passes and logit gradients only, no backward pass.

  Args:
    layers: "all" dense layers, "last", or a sequence of layer names (`dense_layer_names`).
    form: one of `LAI_FORMS` ("outer" and "pairwise" give the same numbers; "outer" is cheaper for few outputs).
    reference: "validation" scores against the validation batch; "batch" is self-influence against the
      training batch itself, for training without a validation set.
  """
  if form not in LAI_FORMS:
    raise ValueError(f"LAI form must be one of {LAI_FORMS}, got {form!r}")
  if reference not in ("validation", "batch"):
    raise ValueError(f"reference must be 'validation' or 'batch', got {reference!r}")

  def taped(params, x, y, tape=None):
    """The batch's selected activations and logit gradients, from `tape` or one taped forward pass."""
    record = tape_lib.forward(model, params, x) if tape is None else tape
    return select_layers(activations(record), layers), logit_grads(loss_fn, record.outputs, y)

  def scores(params, x, y, val_x, val_y, tape=None):
    _check_val(x, val_x)
    acts, g = taped(params, x, y, tape)
    val_acts, val_g = (acts, g) if reference == "batch" else taped(params, val_x, val_y)
    return lai(acts, g, val_acts, val_g, form=form)

  def interactions(params, x, y, tape=None):
    acts, g = taped(params, x, y, tape)
    return lai_pairwise(acts, g, acts, g)

  suffix = "" if layers == "all" else f"[{layers if isinstance(layers, str) else ','.join(layers)}]"
  return Scorer(f"lai{suffix}" + ("" if form == "outer" else f"-{form}") + ("-self" if reference == "batch" else ""),
                scores, interactions)
