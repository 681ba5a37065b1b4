"""Hypergradients: the gradient of an outer loss through k unrolled steps of any optax optimiser.

The inner steps minimise a weighted loss sum_i w_{t,i} l_i; the outer loss (say, a clean validation loss)
is taken after them, and differentiated with respect to whatever the weights depend on. Three ways:

* "exact": reverse-mode autodiff through the `lax.scan` of the k steps (optionally rematerialised
  step by step with `jax.checkpoint`, so memory does not grow with the unrolled activations).
* "first_order": the same, but with every inner step's gradient taken at `stop_gradient(params)`,
  which drops the Hessian terms: exact for one step of any optimiser, an approximation for k > 1.
* "finite_difference": DARTS' central difference along the inner update's direction, for one step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metasel.checks import check_choice

__all__ = ["HYPERGRAD_MODES", "HypergradMode", "InnerOptimizer", "PerSampleLoss", "unroll", "Hypergrad", "hypergrad"]

Params = Any
Batches = tuple[jax.Array, jax.Array]  # (x (k, B, ...), y (k, B)): one batch per unrolled step
PerSampleLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]  # (params, x, y) -> (B,)
InnerOptimizer = Callable[[jax.Array], optax.GradientTransformation]  # learning rate -> optimiser

HYPERGRAD_MODES = ("exact", "first_order", "finite_difference")
HypergradMode = Literal["exact", "first_order", "finite_difference"]




def unroll(
    per_sample_loss: PerSampleLoss,
    inner_optimizer: InnerOptimizer,
    params: Params,
    opt_state: Any,
    weights: jax.Array,
    batches: Batches,
    learning_rate: jax.Array | float,
    *,
    first_order: bool = False,
    remat: bool = False,
) -> tuple[Params, Any]:
  """k inner optimiser steps on the weighted losses sum_i w_{t,i} l_i, as one `lax.scan`.

  Args:
    per_sample_loss: `(params, x, y) -> (B,)`.
    inner_optimizer: `learning_rate -> optax.GradientTransformation`, e.g. `optax.sgd` or `optax.adam`;
      the learning rate may be a traced value.
    params: the starting point.
    opt_state: the inner optimiser's state at `params`.
    weights: (k, B) weights of each step's batch.
    batches: (x (k, B, ...), y (k, B)), one batch per step.
    learning_rate: the inner learning rate (traced).
    first_order: take each step's gradient at `stop_gradient(params)` (no Hessian terms).
    remat: rematerialise each step in the backward pass (`jax.checkpoint`).

  Returns:
    (params, opt_state) after the k steps.
  """
  tx = inner_optimizer(learning_rate)

  def step(carry, inputs):
    params, opt_state = carry
    w, (x, y) = inputs
    at = jax.lax.stop_gradient(params) if first_order else params
    grads = jax.grad(lambda p: jnp.sum(w * per_sample_loss(p, x, y)))(at)
    updates, opt_state = tx.update(grads, opt_state, at)
    return (optax.apply_updates(params, updates), opt_state), None

  if remat:
    step = jax.checkpoint(step)
  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (weights, batches))
  return params, opt_state


class Hypergrad(NamedTuple):
  """The outer loss after the unroll, its gradient w.r.t. the meta-parameters, and the unrolled state."""

  outer_loss: jax.Array
  grads: Params
  params: Params
  opt_state: Any


def hypergrad(
    weigh: Callable[[Params], jax.Array],
    meta_params: Params,
    outer_loss: Callable[[Params], jax.Array],
    per_sample_loss: PerSampleLoss,
    inner_optimizer: InnerOptimizer,
    params: Params,
    opt_state: Any,
    batches: Batches,
    learning_rate: jax.Array | float,
    *,
    mode: HypergradMode = "exact",
    remat: bool = False,
    fd_epsilon: float = 0.01,
) -> Hypergrad:
  """Gradient of `outer_loss(params after k weighted steps)` w.r.t. `meta_params`.

  Args:
    weigh: `meta_params -> (k, B)` weights of the unrolled steps' batches.
    meta_params: what the weights depend on (a meta-network's parameters, or the weights themselves).
    outer_loss: `params -> scalar`, e.g. the mean loss on a clean validation batch.
    per_sample_loss: as in `unroll`.
    inner_optimizer: as in `unroll`.
    params: as in `unroll`.
    opt_state: as in `unroll`.
    batches: as in `unroll`.
    learning_rate: as in `unroll`.
    mode: "exact" (reverse mode through the unroll), "first_order" or "finite_difference" (k = 1 only).
    remat: rematerialise each inner step in the backward pass.
    fd_epsilon: finite-difference step, divided by the norm of the direction (DARTS uses 0.01).
  """
  check_choice("mode", mode, HYPERGRAD_MODES)
  if mode == "finite_difference":
    return _finite_difference_hypergrad(
        weigh, meta_params, outer_loss, per_sample_loss, inner_optimizer, params, opt_state, batches,
        learning_rate, fd_epsilon,
    )

  def objective(meta_params):
    new_params, new_opt_state = unroll(
        per_sample_loss, inner_optimizer, params, opt_state, weigh(meta_params), batches, learning_rate,
        first_order=mode == "first_order", remat=remat,
    )
    return outer_loss(new_params), (new_params, new_opt_state)

  (value, (new_params, new_opt_state)), grads = jax.value_and_grad(objective, has_aux=True)(meta_params)
  return Hypergrad(value, grads, new_params, new_opt_state)


def _finite_difference_hypergrad(
    weigh, meta_params, outer_loss, per_sample_loss, inner_optimizer, params, opt_state, batches,
    learning_rate, fd_epsilon,
) -> Hypergrad:
  """DARTS: dL/dw_i = <v, grad l_i(theta)> with v = (d update / d grad)^T grad L(theta'), by central difference."""
  x, y = batches
  if x.shape[0] != 1:
    raise ValueError(f"finite_difference hypergradients take one inner step; got k={x.shape[0]}")
  weights, weigh_vjp = jax.vjp(weigh, meta_params)
  tx = inner_optimizer(learning_rate)
  grads = jax.grad(lambda p: jnp.sum(weights[0] * per_sample_loss(p, x[0], y[0])))(params)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  value, outer_grad = jax.value_and_grad(outer_loss)(new_params)
  _, update_vjp = jax.vjp(lambda g: tx.update(g, opt_state, params)[0], grads)
  (direction,) = update_vjp(outer_grad)
  eps = fd_epsilon / jnp.maximum(optax.global_norm(direction), 1e-12)
  shifted = lambda sign: optax.apply_updates(params, jax.tree.map(lambda d: sign * eps * d, direction))
  sensitivity = (per_sample_loss(shifted(1.0), x[0], y[0]) - per_sample_loss(shifted(-1.0), x[0], y[0])) / (2 * eps)
  (meta_grads,) = weigh_vjp(sensitivity[None])
  return Hypergrad(value, meta_grads, new_params, new_opt_state)
