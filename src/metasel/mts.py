"""Bi-level data weighting: a meta-network's data weights, trained by the hypergradient of a validation loss.

A meta-network maps per-sample features to weights; the model takes k unrolled steps of an optax
optimiser on the weighted loss; the meta-network learns from the gradient of a clean validation loss
through those steps (`metasel.hypergrad`: exact, first-order or finite-difference, re-exported here).

The methods `uniform`, `l2rw`, `mwn` and `mts` are `metasel.core.Method`s, usable in `train.fit`; the
meta-network sees per-sample `Features` that name their columns (so their width is known).
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

from metasel import checks, persample, records, signals
from metasel.adapters import ModelLike
from metasel.checks import check_choice, check_int, check_positive
from metasel.core import Method, StepContext, keep_state, uniform, weight_diagnostics
from metasel.hypergrad import (
    HYPERGRAD_MODES, Hypergrad, HypergradMode, InnerOptimizer, PerSampleLoss, hypergrad, unroll,
)
from metasel.numerics import safe_divide
from metasel.records import valued

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
    "Features",
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
NORMALIZATIONS = ("sum", "softmax", "clamp")
Normalization = Literal["sum", "softmax", "clamp"]


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
    return safe_divide(clamped, jnp.sum(clamped))
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
# Per-sample features of the meta-network


class Features(NamedTuple):
  """Per-sample features for a meta-network: column names and `fn(ctx) -> (B, len(names))`, the step's
  batch at the step's params.

  Calling a `Features` calls `fn`; its `width` is the number of columns, which the meta-network is
  built for.
  """

  names: tuple[str, ...]
  fn: Callable[[StepContext], jax.Array]

  @property
  def width(self) -> int:
    return len(self.names)

  def __call__(self, ctx: StepContext) -> jax.Array:
    return self.fn(ctx)


@valued
def loss_features(model: ModelLike, loss_fn: persample.LossFn) -> Features:
  """Each sample's current loss (B, 1): Meta-Weight-Net's only feature (the step's own when it has them)."""

  def features(ctx):
    if ctx.losses is not None:
      return ctx.losses[:, None]
    return persample.losses(model, ctx.params, ctx.batch.x, ctx.batch.y, loss_fn)[:, None]

  return Features(("loss",), features)


POSITION_FEATURES = ("cos_class_centre", "cos_ref_centre", "topk_cos_ref", "knn_agreement", "loss_percentile")


@valued
def position_features(model: ModelLike, loss_fn: persample.LossFn, num_classes: int, *, topk: int = 3, knn: int = 5) -> Features:
  """MTS position features (B, 5) of each sample's embedding against the clean validation batch.

  Cosine to its class centre and to the validation centre, top-k cosine to validation samples,
  weighted kNN label agreement and the loss percentile within its class (`signals.position_features`).
  Embeddings are the model's own, or the input of its last dense layer (`persample.embeddings`).
  """

  def features(ctx):
    if ctx.outputs is not None and ctx.embeddings is not None:
      outputs, embeddings = ctx.outputs, ctx.embeddings
    else:
      outputs, embeddings = persample.outputs_and_embeddings(model, ctx.params, ctx.batch.x)
    _, ref_embeddings = persample.outputs_and_embeddings(model, ctx.params, ctx.val_x)
    feats = signals.position_features(
        embeddings, ctx.batch.y, ref_embeddings, ctx.val_y, num_classes,
        losses=loss_fn(outputs, ctx.batch.y), topk=topk, knn=knn,
    )
    return jnp.stack([feats[name] for name in POSITION_FEATURES], axis=-1)

  return Features(POSITION_FEATURES, features)


def table_features(table: jax.Array | np.ndarray, names: tuple[str, ...] | None = None) -> Features:
  """Rows of a fixed per-sample table (N, F) for the batch, e.g. training dynamics from a uniform run."""
  table = np.asarray(table, np.float32)
  if table.ndim != 2:
    raise ValueError(f"feature table must have shape (num_train, num_features), got {table.shape}")
  names = tuple(f"table_{j}" for j in range(table.shape[1])) if names is None else tuple(names)
  if len(names) != table.shape[1]:
    raise ValueError(f"got {len(names)} names for a feature table of {table.shape[1]} columns; expected one per column")
  checks.check_finite_rows("feature table", table, names)
  return records.recipe(_table_features, table=jnp.asarray(table), names=names)


def _table_features(table: jax.Array, names: tuple[str, ...]) -> Features:
  return Features(names, lambda ctx: table[ctx.batch.indices])


@valued
def concat_features(*features: Features) -> Features:
  """Several `Features` side by side (B, F_1 + F_2 + ...)."""
  if not features:
    raise ValueError("concat_features needs at least one Features")
  names = tuple(name for f in features for name in f.names)
  return Features(names, lambda ctx: jnp.concatenate([f(ctx) for f in features], axis=-1))


def zscore(features: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Standardise each feature column over the batch (B, F), as the MTS reference does per batch."""
  return (features - jnp.mean(features, axis=0)) / (jnp.std(features, axis=0) + eps)


# ----------------------------------------------------------------------------------------------------
# Methods


MetaInputs = tuple[jax.Array, jax.Array | None, jax.Array | None]  # features (B, F), labels, groups


def meta_inputs(features: Features, meta_net: MetaNet, ctx: StepContext, *, standardize: bool = True) -> MetaInputs:
  """What the meta-network sees for the step's batch: its features (B, F), labels and groups.

  The features are constants for the meta-gradient (`stop_gradient`) and z-scored over the batch when
  `standardize`; labels and groups are given only when `meta_net` embeds them (else None).
  """
  feats = jax.lax.stop_gradient(features(ctx))
  if feats.ndim != 2 or feats.shape[-1] != features.width:
    raise ValueError(
        f"features {features.names} returned shape {feats.shape}; expected (batch, {features.width}), one column each"
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


def init_meta_net(meta_net: MetaNet, key: jax.Array, width: int) -> Params:
  """A meta-network's initial parameters for `width` features (and its class and group embeddings)."""
  labels = jnp.zeros((1,), jnp.int32) if meta_net.num_classes else None
  groups = jnp.zeros((1,), jnp.int32) if meta_net.num_groups else None
  return meta_net.init(key, jnp.zeros((1, width), jnp.float32), labels, groups)["params"]


class MetaState(NamedTuple):
  """A learned weighting's state: meta-network parameters, optimiser state, skipped meta-steps, inner rate.

  The optimiser state is that of the meta-parameters flattened into one vector. The inner learning rate
  of the virtual steps is state (traced), so it can be scheduled or differentiated without recompiling.
  """

  params: Params
  opt_state: Any
  skipped: jax.Array  # int32: meta-steps dropped because the hypergradient was not finite
  inner_learning_rate: jax.Array


def _per_sample_loss(model: ModelLike, loss_fn: persample.LossFn) -> PerSampleLoss:
  return lambda params, x, y: persample.losses(model, params, x, y, loss_fn)


def _outer_loss(model: ModelLike, loss_fn, ctx: StepContext) -> Callable[[Params], jax.Array]:
  """The mean loss of the step's clean validation batch as a function of the model's params."""
  return lambda params: jnp.mean(persample.losses(model, params, ctx.val_x, ctx.val_y, loss_fn))


def _repeat(tree, k: int):
  """The batch repeated for k unrolled steps: leading axis k."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), tree)


def batch_hypergrad(
    model: ModelLike,
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


@valued
def l2rw(model: ModelLike, loss_fn: persample.LossFn) -> Method:
  """Learning to Reweight (Ren et al. 2018): weights from one virtual SGD step at per-sample epsilon = 0.

  w_i = max(-d L_val / d eps_i, 0), normalised to sum to one; nothing is learned across steps.
  """

  def weights(state, ctx):
    size = ctx.batch.y.shape[0]
    hg = batch_hypergrad(model, loss_fn, lambda eps: eps, jnp.zeros((size,), jnp.float32), ctx, inner_learning_rate=1.0)
    return normalize(-hg.grads, "clamp"), (), {"meta/val_loss": hg.outer_loss}

  return Method(init=lambda key, n: (), weights=weights, update=keep_state, name="l2rw")


def _check_mts_options(steps, normalization, mode, lookahead, inner_learning_rate) -> None:
  check_int("steps", steps)
  check_choice("normalization", normalization, NORMALIZATIONS)
  check_choice("mode", mode, HYPERGRAD_MODES)
  if mode == "finite_difference" and steps != 1:
    raise ValueError(f"finite_difference hypergradients take one inner step; got steps={steps}")
  if not lookahead and (steps != 1 or mode != "exact"):
    raise ValueError(
        f"without lookahead the meta-network learns from the model's own single step exactly; got"
        f" steps={steps}, mode={mode!r} (expected steps=1, mode='exact', or lookahead=True)"
    )
  check_positive("inner_learning_rate", inner_learning_rate)


def meta_step(meta_optimizer: optax.GradientTransformation, state: MetaState, meta_grads: Params):
  """One meta-optimiser step, skipped (and counted) when the hypergradient is not finite: `(state, metrics)`.

  The optimiser works on the meta-parameters flattened into one vector: a few fused operations per step
  instead of several per layer.
  """
  flat_params, unravel = ravel_pytree(state.params)
  flat_grads, _ = ravel_pytree(meta_grads)
  finite = jnp.all(jnp.isfinite(flat_grads))
  safe_grads = jnp.where(finite, flat_grads, 0.0)
  updates, opt_state = meta_optimizer.update(safe_grads, state.opt_state, flat_params)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  new_state = state._replace(
      params=unravel(jnp.where(finite, flat_params + updates, flat_params)),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
  )
  return new_state, {"meta/grad_norm": jnp.linalg.norm(safe_grads), "meta/skipped": new_state.skipped}


@valued
def mts(
    model: ModelLike,
    loss_fn: persample.LossFn,
    features: Features,
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
    model: the model being trained (any Flax model).
    loss_fn: its per-sample loss.
    features: the meta-network's `Features`, e.g. `loss_features`, `position_features`, `table_features`
      or a `concat_features` of them; its width sizes the meta-network.
    meta_net: the network (default: `MetaNet()`, 2 x 100 ReLU, sigmoid).
    meta_optimizer: its optax optimiser (default AdamW 1e-3, weight decay 1e-4).
    lookahead: learn from virtual steps before the model's step (True) or from the model's step (False).
    inner_optimizer: `learning_rate -> optax optimiser` of the virtual steps (default `optax.sgd`).
    inner_learning_rate: their initial learning rate (`MetaState.inner_learning_rate`, traced).
    steps: unrolled virtual steps k >= 1.
    normalization: one of `NORMALIZATIONS`.
    mode: one of `HYPERGRAD_MODES`.
    remat: rematerialise virtual steps in the backward pass.
    standardize: z-score features over the batch.
    name: label in logs.
  """
  meta_net = meta_net or MetaNet()
  meta_optimizer = meta_optimizer or optax.adamw(1e-3, weight_decay=1e-4)
  if not isinstance(records.built_of(features), Features):
    raise ValueError(f"features must be a metasel.mts.Features (names and a function), got {type(features).__name__}")
  _check_mts_options(steps, normalization, mode, lookahead, inner_learning_rate)

  def init(key, num_train):
    params = init_meta_net(meta_net, key, features.width)
    return MetaState(
        params, meta_optimizer.init(ravel_pytree(params)[0]), jnp.zeros((), jnp.int32),
        jnp.asarray(inner_learning_rate, jnp.float32),
    )

  def weigh(meta_params, inputs):  # (B,)
    return meta_weights(meta_net, meta_params, inputs, normalization)

  def lookahead_weights(state, ctx):
    inputs = meta_inputs(features, meta_net, ctx, standardize=standardize)
    hg = batch_hypergrad(
        model, loss_fn, lambda meta_params: weigh(meta_params, inputs), state.params, ctx,
        inner_optimizer=inner_optimizer, inner_learning_rate=state.inner_learning_rate, steps=steps, mode=mode,
        remat=remat,
    )
    new_state, metrics = meta_step(meta_optimizer, state, hg.grads)
    return weigh(new_state.params, inputs), new_state, {"meta/val_loss": hg.outer_loss, **metrics}

  def online_weights(state, ctx):
    inputs = meta_inputs(features, meta_net, ctx, standardize=standardize)
    return weigh(state.params, inputs), inputs, {}

  def online_update(state, ctx, result, inputs):
    val_loss, val_grad = jax.value_and_grad(_outer_loss(model, loss_fn, ctx))(result.params)
    sensitivity = result.weight_vjp(val_grad)  # d L_val(params after the step) / d w_i, (B,)
    _, weigh_vjp = jax.vjp(lambda meta_params: weigh(meta_params, inputs), state.params)
    state, metrics = meta_step(meta_optimizer, state, weigh_vjp(sensitivity)[0])
    return state, {"meta/val_loss": val_loss, **metrics}

  if lookahead:
    return Method(init, lookahead_weights, lambda state, ctx, result, new_state: (new_state, {}), name=name)
  return Method(init, online_weights, online_update, name=name)


@valued
def mwn(model: ModelLike, loss_fn: persample.LossFn, **options) -> Method:
  """Meta-Weight-Net (Shu et al. 2019): a sigmoid MLP (1 x 100) on each sample's raw loss.

  `options` are those of `mts` (a `meta_net` given here replaces the default 1 x 100 network).
  """
  options.setdefault("meta_net", MetaNet(hidden=(100,)))
  options.setdefault("standardize", False)
  options.setdefault("name", "mwn")
  return mts(model, loss_fn, loss_features(model, loss_fn), **options)
