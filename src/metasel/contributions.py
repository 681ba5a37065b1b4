"""True one-step contributions of training samples to a validation loss, all K in one compiled `vmap`.

    Delta_i = L_val(theta) - L_val(theta - eta grad l_i(theta))

Positive means that a step on sample i alone lowers the validation loss. The DVN learns from these, and
online influence scores are judged against them. `first_order_contributions` is the estimate
eta <grad l_i, grad L_val>, and `spearman` the rank correlation used to compare scores with them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from metasel import ghost, persample
from metasel import tape as tape_lib
from metasel.adapters import ModelLike, as_model

__all__ = ["contributions", "first_order_contributions", "spearman"]

Params = Any


def _mean_loss(model, loss_fn, params, x, y) -> jax.Array:
  return jnp.mean(persample.losses(model, params, x, y, loss_fn))


def contributions(
    model: ModelLike,
    loss_fn: persample.LossFn,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    step_size: jax.Array | float,
    *,
    method: persample.Strategy = "ghost",
    tape: tape_lib.Tape | None = None,
) -> jax.Array:
  """True one-step contributions (K,): L_val(theta) - L_val(theta - eta grad l_i(theta)) for each row of x.

  One program for all K rows: a `vmap` over the rows of "SGD step of size eta on the sample's loss, then
  the validation loss", so K stepped models are evaluated on the validation batch at once.

  method="vmap" forms each sample's full gradient. method="ghost" (exact as well) records one tape of
  the K rows and steps every taped layer by the sample's gradient in factored form without forming it
  (`ghost.correction`): a dense layer's validation output changes by (x A^T) D, so the validation
  batch's product with the unchanged first layer is shared by all K models. Parameters no layer tapes
  take full per-sample gradients. `tape`: a `persample.record` of these rows at `params` to reuse.
  """
  if method not in ("ghost", "vmap"):
    raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}")
  model = as_model(model)
  base = _mean_loss(model, loss_fn, params, val_x, val_y)
  leaves, treedef = jax.tree.flatten(params)
  factors: dict[tuple[int, ...], Any] = {}
  others = tuple(range(len(leaves)))
  if method == "ghost":
    recorded = persample.record(model, params, x, y, loss_fn) if tape is None else tape
    factors = {layer.info.leaves: ghost.step_factors(layer, -step_size) for layer in recorded.ghost_layers}
    others = persample.fallback_leaves(model, params, recorded)
  example_grad = persample.example_grad_fn(model, loss_fn, params, others)
  val_plan = tape_lib.make_plan(model, params, val_x)  # every stepped model shares the unchanged one's

  def one(x_i, y_i, factors_i):
    stepped = list(leaves)
    if others:
      grads = example_grad(tuple(leaves[i] for i in others), x_i, y_i)
      for i, g in zip(others, grads):
        stepped[i] = leaves[i] - step_size * g
    fwd = tape_lib.forward(model, treedef.unflatten(stepped), val_x, steps=factors_i, plan=val_plan)
    return base - jnp.mean(loss_fn(fwd.outputs, val_y))

  return jax.vmap(one)(x, y, factors)


def first_order_contributions(
    model: ModelLike,
    loss_fn: persample.LossFn,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    step_size: jax.Array | float,
    *,
    tape: tape_lib.Tape | None = None,
) -> jax.Array:
  """First-order estimate (K,) of `contributions`: eta <grad l_i, grad L_val>, by ghost dot products.

  It is exact to first order in eta: the difference to `contributions` shrinks like eta^2.
  """
  val_grad = jax.grad(lambda p: _mean_loss(model, loss_fn, p, val_x, val_y))(params)
  return step_size * persample.grad_dots(model, params, x, y, val_grad, loss_fn, tape=tape)


def _average_ranks(values: jax.Array) -> jax.Array:
  """Ranks 1..n of `values` (n,), ties sharing the mean of their ranks (as scipy's rankdata)."""
  ordered = jnp.sort(values)
  below = jnp.searchsorted(ordered, values, side="left")
  through = jnp.searchsorted(ordered, values, side="right")
  return (below + through + 1) / 2.0


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
  """Spearman rank correlation of two vectors (n,), ties given average ranks; NaN when one is constant."""
  if jnp.shape(a) != jnp.shape(b) or jnp.ndim(a) != 1:
    raise ValueError(f"spearman needs two vectors of the same length, got shapes {jnp.shape(a)} and {jnp.shape(b)}")
  ra = _average_ranks(jnp.asarray(a, jnp.float32))
  rb = _average_ranks(jnp.asarray(b, jnp.float32))
  ra, rb = ra - ra.mean(), rb - rb.mean()
  return jnp.sum(ra * rb) / jnp.sqrt(jnp.sum(ra * ra) * jnp.sum(rb * rb))
