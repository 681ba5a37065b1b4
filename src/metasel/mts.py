"""Bi-level data weighting: a meta-network's data weights, unrolled inner steps and their hypergradient.

A meta-network maps per-sample features to weights; the model takes k unrolled steps of an optax
optimiser on the weighted loss; the meta-network learns from the gradient of a clean validation loss
through those steps (the hypergradient). Three ways to take that gradient:

* "exact": reverse-mode autodiff through the `lax.scan` of the k steps (optionally rematerialised
  step by step with `jax.checkpoint`, so memory does not grow with the unrolled activations).
* "first_order": the same, but with every inner step's gradient taken at `stop_gradient(params)`,
  which drops the Hessian terms: exact for one step of any optimiser, an approximation for k > 1.
* "finite_difference": DARTS' central difference along the inner update's direction, for one step.

The methods `uniform`, `l2rw`, `mwn` and `mts` are `metasel.train.Method`s, usable in `train.fit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from metasel import persample, signals
from metasel.checks import check_int
from metasel.train import Method, StepContext, uniform, weight_diagnostics

__all__ = [
    "NORMALIZATIONS",
    "HYPERGRAD_MODES",
    "normalize",
    "weight_diagnostics",
    "MetaNet",
    "unroll",
    "Hypergrad",
    "hypergrad",
    "batch_hypergrad",
    "FeatureFn",
    "loss_features",
    "position_features",
    "table_features",
    "concat_features",
    "zscore",
    "MetaInputs",
    "meta_inputs",
    "meta_weights",
    "MetaState",
    "uniform",
    "l2rw",
    "mwn",
    "mts",
]

Params = Any
Batches = tuple[jax.Array, jax.Array]  # (x (k, B, ...), y (k, B)): one batch per unrolled step
PerSampleLoss = Callable[[Params, jax.Array, jax.Array], jax.Array]  # (params, x, y) -> (B,)
InnerOptimizer = Callable[[jax.Array], optax.GradientTransformation]  # learning rate -> optimiser
FeatureFn = Callable[[Params, StepContext], jax.Array]  # (model params, step context) -> (B, F)

NORMALIZATIONS = ("sum", "softmax", "clamp")
HYPERGRAD_MODES = ("exact", "first_order", "finite_difference")
Normalization = Literal["sum", "softmax", "clamp"]
HypergradMode = Literal["exact", "first_order", "finite_difference"]


# ----------------------------------------------------------------------------------------------------
# Weights


def normalize(raw: jax.Array, how: Normalization = "sum") -> jax.Array:
  """Per-batch weights p (B,) from raw scores (B,).

  "sum": p_i = w_i / sum_j w_j for non-negative w (MTS, Meta-Weight-Net); "softmax": p = softmax(w);
  "clamp": L2RW's max(w, 0) / sum_j max(w_j, 0), all zero when no score is positive (no step, as in
  Ren et al. 2018).
  """
  if how == "sum":
    return raw / jnp.sum(raw)
  if how == "softmax":
    return jax.nn.softmax(raw)
  if how == "clamp":
    clamped = jnp.maximum(raw, 0.0)
    total = jnp.sum(clamped)
    return jnp.where(total > 0, clamped / jnp.where(total > 0, total, 1.0), 0.0)
  raise ValueError(f"unknown normalization {how!r}; expected one of {NORMALIZATIONS}")


class MetaNet(nn.Module):
  """MLP from per-sample features (B, F) to non-negative raw weights (B,).

  Optional learned embeddings of the class label and of the real/synthetic group are concatenated to
  the features, as in the MTS reference network (2 x 100 ReLU, sigmoid, 4-d class and 1-d group).

  Attributes:
    hidden: hidden layer widths.
    output: "sigmoid" or "softplus".
    num_classes: classes to embed (0: no class embedding).
    class_features: width of the class embedding.
    num_groups: groups to embed (0: no group embedding).
    group_features: width of the group embedding.
  """

  hidden: Sequence[int] = (100, 100)
  output: str = "sigmoid"
  num_classes: int = 0
  class_features: int = 4
  num_groups: int = 0
  group_features: int = 1

  @nn.compact
  def __call__(self, features: jax.Array, labels: jax.Array | None = None, groups: jax.Array | None = None):
    parts = [features]
    if self.num_classes:
      if labels is None:
        raise ValueError("this MetaNet embeds classes (num_classes > 0); pass labels (B,)")
      parts.append(nn.Embed(self.num_classes, self.class_features, name="class_embedding")(labels))
    if self.num_groups:
      if groups is None:
        raise ValueError("this MetaNet embeds groups (num_groups > 0); pass groups (B,)")
      parts.append(nn.Embed(self.num_groups, self.group_features, name="group_embedding")(groups))
    h = jnp.concatenate(parts, axis=-1)
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    score = nn.Dense(1)(h)[:, 0]
    if self.output == "sigmoid":
      return nn.sigmoid(score)
    if self.output == "softplus":
      return nn.softplus(score)
    raise ValueError(f"unknown MetaNet output {self.output!r}; expected 'sigmoid' or 'softplus'")


# ----------------------------------------------------------------------------------------------------
# Inner steps and the hypergradient


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
    params, opt_state: the starting point; `opt_state` is the inner optimiser's state.
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
    per_sample_loss, inner_optimizer, params, opt_state, batches, learning_rate: as in `unroll`.
    mode: "exact" (reverse mode through the unroll), "first_order" or "finite_difference" (k = 1 only).
    remat: rematerialise each inner step in the backward pass.
    fd_epsilon: finite-difference step, divided by the norm of the direction (DARTS uses 0.01).
  """
  _check_choice("mode", mode, HYPERGRAD_MODES)
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


# ----------------------------------------------------------------------------------------------------
# Per-sample features of the meta-network


def loss_features(model: nn.Module, loss_fn: persample.LossFn) -> FeatureFn:
  """Each sample's current loss (B, 1): Meta-Weight-Net's only feature."""

  def features(params, ctx):
    if ctx.losses is not None and params is ctx.params:
      return ctx.losses[:, None]
    return persample.losses(model, params, ctx.batch.x, ctx.batch.y, loss_fn)[:, None]

  return features


def position_features(model: nn.Module, loss_fn: persample.LossFn, num_classes: int, *, topk: int = 3, knn: int = 5) -> FeatureFn:
  """MTS position features (B, 5) of each sample's embedding against the clean validation batch.

  Cosine to its class centre and to the validation centre, top-k cosine to validation samples,
  weighted kNN label agreement and the loss percentile within its class (`signals.position_features`).
  """

  def features(params, ctx):
    if ctx.outputs is not None and params is ctx.params:
      outputs, embeddings = ctx.outputs, ctx.embeddings
    else:
      outputs, embeddings = model.apply({"params": params}, ctx.batch.x)
    _, ref_embeddings = model.apply({"params": params}, ctx.val_x)
    feats = signals.position_features(
        embeddings, ctx.batch.y, ref_embeddings, ctx.val_y, num_classes,
        losses=loss_fn(outputs, ctx.batch.y), topk=topk, knn=knn,
    )
    return jnp.stack(list(feats.values()), axis=-1)

  return features


def table_features(table: jax.Array | np.ndarray) -> FeatureFn:
  """Rows of a fixed per-sample table (N, F) for the batch, e.g. training dynamics from a uniform run."""
  table = np.asarray(table, np.float32)
  if table.ndim != 2:
    raise ValueError(f"feature table must have shape (num_train, num_features), got {table.shape}")
  if not np.all(np.isfinite(table)):
    rows = np.flatnonzero(~np.all(np.isfinite(table), axis=1))
    raise ValueError(f"feature table has NaN or inf in {len(rows)} rows (first: row {rows[0]}); expected finite values")
  table = jnp.asarray(table)
  return lambda params, ctx: table[ctx.batch.indices]


def concat_features(*fns: FeatureFn) -> FeatureFn:
  """Features of several feature functions side by side (B, F_1 + F_2 + ...)."""
  if not fns:
    raise ValueError("concat_features needs at least one feature function")
  return lambda params, ctx: jnp.concatenate([fn(params, ctx) for fn in fns], axis=-1)


def zscore(features: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Standardise each feature column over the batch (B, F), as the MTS reference does per batch."""
  return (features - jnp.mean(features, axis=0)) / (jnp.std(features, axis=0) + eps)


# ----------------------------------------------------------------------------------------------------
# Methods


MetaInputs = tuple[jax.Array, jax.Array | None, jax.Array | None]  # features (B, F), labels, groups


def meta_inputs(
    features: FeatureFn, num_features: int, meta_net: MetaNet, ctx: StepContext, *, standardize: bool = True
) -> MetaInputs:
  """What the meta-network sees for the step's batch: its features (B, F), labels and groups.

  The features are constants for the meta-gradient (`stop_gradient`) and z-scored over the batch when
  `standardize`; labels and groups are given only when `meta_net` embeds them (else None).
  """
  feats = jax.lax.stop_gradient(features(ctx.params, ctx))
  if feats.ndim != 2 or feats.shape[-1] != num_features:
    raise ValueError(
        f"features returned shape {feats.shape}; expected (batch, {num_features}) to match num_features"
    )
  feats = zscore(feats) if standardize else feats
  if meta_net.num_groups and ctx.batch.groups is None:
    raise ValueError(
        "meta_net embeds real/synthetic groups (num_groups > 0) but the batch has none; expected"
        " Batch.groups, which the training loop fills from Split.groups"
    )
  return feats, ctx.batch.y if meta_net.num_classes else None, ctx.batch.groups if meta_net.num_groups else None


def meta_weights(meta_net: MetaNet, meta_params: Params, inputs: MetaInputs, normalization: Normalization = "sum") -> jax.Array:
  """The batch's normalised weights (B,) from the meta-network's raw weights on `meta_inputs`."""
  return normalize(meta_net.apply({"params": meta_params}, *inputs), normalization)


class MetaState(NamedTuple):
  """A learned weighting's state: meta-network parameters, optimiser state and skipped meta-steps.

  The optimiser state is that of the meta-parameters flattened into one vector.
  """

  params: Params
  opt_state: Any
  skipped: jax.Array  # int32: meta-steps dropped because the hypergradient was not finite


def _per_sample_loss(model: nn.Module, loss_fn: persample.LossFn) -> PerSampleLoss:
  return lambda params, x, y: persample.losses(model, params, x, y, loss_fn)


def _outer_loss(model, loss_fn, ctx: StepContext) -> Callable[[Params], jax.Array]:
  """The mean loss of the step's clean validation batch as a function of the model's params."""
  return lambda params: jnp.mean(persample.losses(model, params, ctx.val_x, ctx.val_y, loss_fn))


def _repeat(tree, k: int):
  """The batch repeated for k unrolled steps: leading axis k."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), tree)


def batch_hypergrad(
    model: nn.Module,
    loss_fn: persample.LossFn,
    weigh: Callable[[Params], jax.Array],
    meta_params: Params,
    ctx: StepContext,
    *,
    inner_optimizer: InnerOptimizer = optax.sgd,
    inner_learning_rate: jax.Array | float = 0.1,
    steps: int = 1,
    mode: HypergradMode = "exact",
    remat: bool = False,
) -> Hypergrad:
  """`hypergrad` of the validation batch's mean loss after `steps` virtual steps on the step's batch.

  `weigh(meta_params)` gives the batch's weights (B,), used in every virtual step; the inner optimiser
  starts from a fresh state at `ctx.params`.
  """
  size = ctx.batch.y.shape[0]
  return hypergrad(
      lambda meta_params: jnp.broadcast_to(weigh(meta_params), (steps, size)),
      meta_params, _outer_loss(model, loss_fn, ctx), _per_sample_loss(model, loss_fn), inner_optimizer,
      ctx.params, inner_optimizer(inner_learning_rate).init(ctx.params),
      _repeat((ctx.batch.x, ctx.batch.y), steps), inner_learning_rate, mode=mode, remat=remat,
  )


def l2rw(model: nn.Module, loss_fn: persample.LossFn) -> Method:
  """Learning to Reweight (Ren et al. 2018): weights from one virtual SGD step at per-sample epsilon = 0.

  w_i = max(-d L_val / d eps_i, 0), normalised to sum to one; nothing is learned across steps.
  """

  def weights(state, ctx):
    size = ctx.batch.y.shape[0]
    hg = batch_hypergrad(model, loss_fn, lambda eps: eps, jnp.zeros((size,), jnp.float32), ctx, inner_learning_rate=1.0)
    return normalize(-hg.grads, "clamp"), state, {"meta/val_loss": hg.outer_loss}

  return Method(init=lambda key, n: (), weights=weights, update=lambda state, ctx, result: (state, {}), name="l2rw")


def mts(
    model: nn.Module,
    loss_fn: persample.LossFn,
    features: FeatureFn,
    num_features: int,
    *,
    meta_net: MetaNet | None = None,
    meta_optimizer: optax.GradientTransformation | None = None,
    lookahead: bool = True,
    inner_optimizer: InnerOptimizer = optax.sgd,
    inner_learning_rate: float = 0.1,
    steps: int = 1,
    normalization: Normalization = "sum",
    mode: HypergradMode = "exact",
    remat: bool = False,
    standardize: bool = True,
    name: str = "mts",
) -> Method:
  """Meta-learned data weights: a `MetaNet` on per-sample features, trained by the hypergradient.

  Features of the batch (z-scored over the batch when `standardize`) go through the meta-network,
  with the batch's labels and real/synthetic groups when it embeds them.
  With `lookahead` (Meta-Weight-Net's order): `steps` virtual inner steps on the batch with those
  weights (the inner optimiser starting from a fresh state), the validation batch's loss after them is
  differentiated w.r.t. the meta-network, which takes one `meta_optimizer` step, and the updated
  meta-network weights the model's own step. Without `lookahead` (online): the current meta-network
  weights the model's own step, and the meta-network then learns from the exact gradient of the
  validation loss after that very step (the loop's optimiser and its state, no virtual step; `steps`,
  `mode`, `remat` and the inner optimiser do not apply). A hypergradient that is not finite skips the
  meta-step and is counted in `MetaState.skipped`.

  Args:
    model, loss_fn: the model being trained and its per-sample loss.
    features: `(params, ctx) -> (B, num_features)`, e.g. `loss_features`, `position_features`,
      `table_features` or a `concat_features` of them.
    num_features: the width F that `features` returns (checked when the step is traced).
    meta_net: the network (default: `MetaNet()`, 2 x 100 ReLU, sigmoid).
    meta_optimizer: its optax optimiser (default AdamW 1e-3, weight decay 1e-4).
    lookahead: learn from virtual steps before the model's step (True) or from the model's step (False).
    inner_optimizer: `learning_rate -> optax optimiser` of the virtual steps (default `optax.sgd`).
    inner_learning_rate: their learning rate.
    steps: unrolled virtual steps k >= 1.
    normalization: one of `NORMALIZATIONS`.
    mode: one of `HYPERGRAD_MODES`.
    remat: rematerialise virtual steps in the backward pass.
    standardize: z-score features over the batch.
    name: label in logs.
  """
  meta_net = meta_net or MetaNet()
  meta_optimizer = meta_optimizer or optax.adamw(1e-3, weight_decay=1e-4)
  check_int("steps", steps)
  check_int("num_features", num_features)
  _check_choice("normalization", normalization, NORMALIZATIONS)
  _check_choice("mode", mode, HYPERGRAD_MODES)
  if mode == "finite_difference" and steps != 1:
    raise ValueError(f"finite_difference hypergradients take one inner step; got steps={steps}")
  if not lookahead and (steps != 1 or mode != "exact"):
    raise ValueError(
        f"without lookahead the meta-network learns from the model's own single step exactly; got"
        f" steps={steps}, mode={mode!r} (expected steps=1, mode='exact', or lookahead=True)"
    )
  if not inner_learning_rate > 0:
    raise ValueError(f"inner_learning_rate must be positive, got {inner_learning_rate!r}")

  def inputs_of(ctx):
    return meta_inputs(features, num_features, meta_net, ctx, standardize=standardize)

  def weigh(meta_params, inputs):  # (B,)
    return meta_weights(meta_net, meta_params, inputs, normalization)

  def init(key, num_train):
    labels = jnp.zeros((1,), jnp.int32) if meta_net.num_classes else None
    group = jnp.zeros((1,), jnp.int32) if meta_net.num_groups else None
    params = meta_net.init(key, jnp.zeros((1, num_features), jnp.float32), labels, group)["params"]
    return MetaState(params, meta_optimizer.init(ravel_pytree(params)[0]), jnp.zeros((), jnp.int32))

  def meta_step(state, meta_grads):
    """One meta-optimiser step, skipped (and counted) when the hypergradient is not finite.

    The optimiser works on the meta-parameters flattened into one vector: a few fused operations per
    step instead of several per layer.
    """
    flat_params, unravel = ravel_pytree(state.params)
    flat_grads, _ = ravel_pytree(meta_grads)
    finite = jnp.all(jnp.isfinite(flat_grads))
    safe_grads = jnp.where(finite, flat_grads, 0.0)
    updates, opt_state = meta_optimizer.update(safe_grads, state.opt_state, flat_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = MetaState(
        unravel(jnp.where(finite, flat_params + updates, flat_params)),
        keep(opt_state, state.opt_state),
        state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
    )
    return new_state, {"meta/grad_norm": jnp.linalg.norm(safe_grads), "meta/skipped": new_state.skipped}

  def lookahead_weights(state, ctx):
    inputs = inputs_of(ctx)
    hg = batch_hypergrad(
        model, loss_fn, lambda meta_params: weigh(meta_params, inputs), state.params, ctx,
        inner_optimizer=inner_optimizer, inner_learning_rate=inner_learning_rate, steps=steps, mode=mode,
        remat=remat,
    )
    state, metrics = meta_step(state, hg.grads)
    return weigh(state.params, inputs), state, {"meta/val_loss": hg.outer_loss, **metrics}

  def online_weights(state, ctx):
    inputs = inputs_of(ctx)
    return weigh(state.params, inputs), (state, inputs), {}

  def online_update(carried, ctx, result):
    state, inputs = carried
    val_loss, val_grad = jax.value_and_grad(_outer_loss(model, loss_fn, ctx))(result.params)
    sensitivity = result.weight_vjp(val_grad)  # d L_val(params after the step) / d w_i, (B,)
    _, weigh_vjp = jax.vjp(lambda meta_params: weigh(meta_params, inputs), state.params)
    state, metrics = meta_step(state, weigh_vjp(sensitivity)[0])
    return state, {"meta/val_loss": val_loss, **metrics}

  if lookahead:
    return Method(init, lookahead_weights, lambda state, ctx, result: (state, {}), name=name)
  return Method(init, online_weights, online_update, name=name)


def mwn(model: nn.Module, loss_fn: persample.LossFn, **options) -> Method:
  """Meta-Weight-Net (Shu et al. 2019): a sigmoid MLP (1 x 100) on each sample's raw loss.

  `options` are those of `mts` (a `meta_net` given here replaces the default 1 x 100 network).
  """
  options.setdefault("meta_net", MetaNet(hidden=(100,)))
  options.setdefault("standardize", False)
  options.setdefault("name", "mwn")
  return mts(model, loss_fn, loss_features(model, loss_fn), 1, **options)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")
