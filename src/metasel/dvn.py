"""Data Valuation Network (DVN): a sampler that learns which samples lower the validation loss.

A small MLP g_phi maps each training sample's cheap proxy features h_i (per-sample loss, gradient
norm, embedding norm) to a score s_i, and the next batch is drawn with p_i proportional to
exp(s_i / temperature) over the training pool. Every `period` steps, `num_samples` (K) samples drawn
uniformly from the pool have their true one-step contribution measured,

    Delta_i = L_val(theta) - L_val(theta - eta grad l_i(theta)),

all K at once as one `vmap` of the one-step update, and g_phi is regressed on them with Adam.
`first_order_contributions` gives the estimate eta <grad l_i, grad L_val> from ghost dot products.

The samplers (`dvn`, `grad_norm_sampler`) are `metasel.train.Method`s with `probs`, so the shared
training loop draws its batches from them. Both keep a table of every pool sample's features as last
measured: the whole pool at the first step (and every `refresh_every` steps if set), and each batch's
rows at every step, read off the training step's own forward and backward pass (`StepResult.tape`), so
they cost no extra pass. Scores follow the table.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from metasel import persample
from metasel import checks
from metasel.models import GHOST_UPDATE
from metasel.train import Method, StepContext, StepResult

__all__ = [
    "PROXY_FEATURES",
    "ProxyFeatures",
    "proxy_features",
    "table_signal",
    "check_features",
    "DVN",
    "sampling_probs",
    "contributions",
    "first_order_contributions",
    "spearman",
    "DVNState",
    "SamplerState",
    "dvn",
    "grad_norm_sampler",
]

Params = Any
Normalization = Literal["softmax", "none"]
Target = Literal["exact", "first_order"]
PROXY_FEATURES = ("loss", "grad_norm", "embedding_norm")
ExtraSignal = Callable[[persample.GhostTape, jax.Array, jax.Array], jax.Array]  # (tape, y (B,), rows (B,)) -> (B,)


# ----------------------------------------------------------------------------------------------------
# Proxy features


class ProxyFeatures(NamedTuple):
  """Named per-sample features (B, len(names)) of samples x (B, ...), y (B,) at pool indices rows (B,).

  `fn(params, x, y, rows)` runs the model for them; `from_tape(params, tape, x, y, rows)` reads them off
  a `persample.GhostTape` of that batch, such as the training step's own (`train.StepResult.tape`).
  """

  names: tuple[str, ...]
  fn: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]
  from_tape: Callable[[Params, persample.GhostTape, jax.Array, jax.Array, jax.Array], jax.Array]


def proxy_features(
    model: nn.Module,
    loss_fn: persample.LossFn,
    *,
    include: Sequence[str] = PROXY_FEATURES,
    extra: Mapping[str, ExtraSignal] | None = None,
) -> ProxyFeatures:
  """The DVN's cheap per-sample features, from one forward and one backward pass to the layer outputs.

  Args:
    model: Flax module returning `(outputs, embedding)`.
    loss_fn: per-sample loss.
    include: any of "loss", "grad_norm" (exact, by the ghost identity) and "embedding_norm", in order.
    extra: more named signals `(tape, targets, rows) -> (B,)` from the same `persample.GhostTape` and
      the samples' pool indices, e.g. `{"margin": lambda tape, y, rows: signals.margin(tape.outputs, y)}`,
      or a per-sample table through `table_signal`.
  """
  include = tuple(include)
  extra = dict(extra or {})
  unknown = [name for name in include if name not in PROXY_FEATURES]
  if unknown or len(set(include)) != len(include):
    raise ValueError(f"include must list distinct names from {PROXY_FEATURES}, got {include!r}")
  clashes = set(extra) & set(include)
  if clashes:
    raise ValueError(f"extra signals reuse the names {sorted(clashes)}; expected names distinct from include")
  names = include + tuple(extra)
  if not names:
    raise ValueError("proxy_features needs at least one feature; include and extra are both empty")

  def from_tape(params, tape, x, y, rows):
    columns = {
        "loss": lambda: tape.losses,
        "grad_norm": lambda: persample.grad_norms(model, params, x, y, loss_fn, tape=tape),
        "embedding_norm": lambda: jnp.linalg.norm(tape.embeddings, axis=-1),
    }
    values = [columns[name]() for name in include] + [signal(tape, y, rows) for signal in extra.values()]
    return jnp.stack([jnp.asarray(v, jnp.float32).reshape(-1) for v in values], axis=-1)  # (B, F)

  def fn(params, x, y, rows):
    return from_tape(params, persample.record(model, params, x, y, loss_fn), x, y, rows)

  return ProxyFeatures(names, fn, from_tape)


def table_signal(table: jax.Array | np.ndarray, name: str = "table") -> ExtraSignal:
  """A fixed per-sample signal (N,) of the pool (e.g. a training-dynamics summary) as an extra feature.

  The table is checked for NaN and inf here, before any compute.
  """
  table = np.asarray(table, dtype=np.float32)
  if table.ndim != 1:
    raise ValueError(f"{name} must have shape (N,), one value per pool sample, got shape {table.shape}")
  check_features(table[:, None], (name,))
  values = jnp.asarray(table)
  return lambda tape, y, rows: values[rows]


def check_features(features: jax.Array | np.ndarray, names: Sequence[str] = ()) -> None:
  """Raise a clear ValueError when a (concrete) feature table holds NaN or inf."""
  if isinstance(features, jax.core.Tracer):
    return
  values = np.asarray(features, dtype=np.float64)
  bad = ~np.isfinite(values)
  if bad.any():
    row, column = (int(i) for i in np.argwhere(bad.reshape(values.shape[0], -1))[0])
    label = names[column] if column < len(names) else f"column {column}"
    raise ValueError(
        f"features contain {int(bad.sum())} NaN or inf values (first: row {row}, {label});"
        " expected finite features"
    )


# ----------------------------------------------------------------------------------------------------
# The network and its sampling distribution


class DVN(nn.Module):
  """Scores (B,) from features (B, F): an MLP (2 x 128, ReLU by default) with a zero-initialised output.

  The zero output layer makes every initial score 0, i.e. uniform sampling until the first fit.
  """

  hidden: Sequence[int] = (128, 128)
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    h = features
    for width in self.hidden:
      h = self.activation(nn.Dense(width)(h))
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


def sampling_probs(scores: jax.Array, normalization: Normalization = "softmax", temperature: float = 1.0) -> jax.Array:
  """Sampling distribution (N,) over the pool from scores (N,).

  "softmax": p_i proportional to exp(s_i / temperature). "none" (the ablation): the scores used as
  weights directly, p_i proportional to max(s_i, 0), and uniform while no score is positive.
  """
  if normalization == "softmax":
    return jax.nn.softmax(scores / temperature)
  if normalization == "none":
    weights = jnp.maximum(scores, 0.0)
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / scores.shape[0])
  raise ValueError(f"unknown normalization {normalization!r}; expected 'softmax' or 'none'")


# ----------------------------------------------------------------------------------------------------
# True contributions


def _mean_loss(model, loss_fn, params, x, y) -> jax.Array:
  return jnp.mean(persample.losses(model, params, x, y, loss_fn))


def contributions(
    model: nn.Module,
    loss_fn: persample.LossFn,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    step_size: float,
    *,
    method: persample.Method = "ghost",
    tape: persample.GhostTape | None = None,
) -> jax.Array:
  """True one-step contributions (K,): L_val(theta) - L_val(theta - eta grad l_i(theta)) for each row.

  One program for all K rows: a `vmap` over the rows of "SGD step of size eta on the sample's loss,
  then the validation loss", so K stepped models are evaluated on the validation batch at once.
  Positive means that a step on the sample alone lowers the validation loss.

  method="vmap" forms each sample's full gradient. method="ghost" (exact as well) records one
  `persample.GhostTape` of the K rows and steps every dense `GhostDense` layer by its rank-one
  gradient a_i d_i^T without forming it (`models.GHOST_UPDATE`): the validation batch's product with
  the first layer's kernel is then shared by all K models. Other parameters take full gradients.
  `tape`: a `persample.record` of these rows at `params` to reuse on the ghost path.
  """
  if method not in ("ghost", "vmap"):
    raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}")
  base = _mean_loss(model, loss_fn, params, val_x, val_y)
  flat = traverse_util.flatten_dict(params)
  rank_one: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}
  if method == "ghost":
    tape = persample.record(model, params, x, y, loss_fn) if tape is None else tape
    # A layer used at one position per sample has a rank-one per-sample gradient.
    rank_one = {p: (a, tape.output_grads[p]) for p, a in tape.inputs.items() if a.ndim == 2}
  others = {k: v for k, v in flat.items() if k[:-1] not in rank_one}
  frozen = {k: v for k, v in flat.items() if k not in others}
  example_grad = persample.example_grad_fn(model, loss_fn, frozen)

  def one(x_i, y_i, factors_i):
    stepped = dict(flat)
    if others:
      grads = example_grad(others, x_i, y_i)
      stepped.update({k: v - step_size * grads[k] for k, v in others.items()})
    update = {}
    for path, (a, d) in factors_i.items():
      update[path + ("input",)] = a
      update[path + ("output",)] = -step_size * d
    variables = {"params": traverse_util.unflatten_dict(stepped)}
    if update:
      variables[GHOST_UPDATE] = traverse_util.unflatten_dict(update)
    outputs, _ = model.apply(variables, val_x)
    return base - jnp.mean(loss_fn(outputs, val_y))

  return jax.vmap(one)(x, y, rank_one)


def first_order_contributions(
    model: nn.Module,
    loss_fn: persample.LossFn,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    val_x: jax.Array,
    val_y: jax.Array,
    step_size: float,
) -> jax.Array:
  """First-order estimate (K,) of `contributions`: eta <grad l_i, grad L_val>, by ghost dot products.

  It is exact to first order in eta: the difference to `contributions` shrinks like eta^2.
  """
  val_grad = jax.grad(lambda p: _mean_loss(model, loss_fn, p, val_x, val_y))(params)
  return step_size * persample.grad_dots(model, params, x, y, val_grad, loss_fn)


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


# ----------------------------------------------------------------------------------------------------
# Samplers for the training loop


class DVNState(NamedTuple):
  """The value network and what it is fitted on.

  Attributes:
    params: DVN parameters.
    opt_state: Adam state.
    feature_mean, feature_scale: (F,) standardisation of the features, from the pool at the last fit.
    target_mean, target_scale: () standardisation of the contributions in `memory_targets`.
    memory_features: (M, F) features of the most recently probed samples (a ring buffer).
    memory_targets: (M,) their measured contributions.
    memory_count: probed samples so far (entries beyond it are unused).
    spearman: rank correlation between predicted and true contributions at the last meta-update,
      measured before that update's fit.
    first_order_spearman: between the true contributions and their first-order estimates, same samples.
    fit_loss: the regression loss after the last fit.
  """

  params: Params
  opt_state: Any
  feature_mean: jax.Array
  feature_scale: jax.Array
  target_mean: jax.Array
  target_scale: jax.Array
  memory_features: jax.Array
  memory_targets: jax.Array
  memory_count: jax.Array
  spearman: jax.Array
  first_order_spearman: jax.Array
  fit_loss: jax.Array


class SamplerState(NamedTuple):
  """A table sampler's state: pool features (N, F), scores (N,), the step, and the DVN (or ())."""

  features: jax.Array
  scores: jax.Array
  step: jax.Array
  dvn: DVNState | tuple = ()


def _check_sampler_ctx(ctx: StepContext) -> None:
  if ctx.train_x is None or ctx.train_y is None:
    raise ValueError(
        "this sampler probes the whole training pool; expected a StepContext with train_x and train_y"
        " (metasel.train's loop fills them in)"
    )


def _pool_table(state: SamplerState, ctx: StepContext, features: ProxyFeatures, refresh_every: int | None):
  """The feature table before this step: the whole pool re-measured at step 0 (and every `refresh_every` steps).

  Returns the table (N, F) and whether it was re-measured.
  """
  _check_sampler_ctx(ctx)
  refresh = state.step == 0 if refresh_every is None else state.step % refresh_every == 0
  pool_rows = jnp.arange(ctx.train_x.shape[0])
  table = jax.lax.cond(
      refresh, lambda: features.fn(ctx.params, ctx.train_x, ctx.train_y, pool_rows), lambda: state.features
  )
  return table, refresh


def _batch_rows(features: ProxyFeatures, ctx: StepContext, result: StepResult) -> jax.Array:
  """The batch's features (B, F) at the step's params, read off the step's own tape when it has one."""
  batch = ctx.batch
  if result.tape is None:
    return features.fn(ctx.params, batch.x, batch.y, batch.indices)
  return features.from_tape(ctx.params, result.tape, batch.x, batch.y, batch.indices)


def _uniform_weights(size: int) -> jax.Array:
  return jnp.full((size,), 1.0 / size, jnp.float32)


def _pool_diagnostics(probs: jax.Array) -> dict[str, jax.Array]:
  """Effective number of pool samples 1 / sum p_i^2 and the largest probability of the sampler."""
  return {"sampler/pool_ess": 1.0 / jnp.sum(jnp.square(probs)), "sampler/max_prob": jnp.max(probs)}


def dvn(
    model: nn.Module,
    loss_fn: persample.LossFn,
    *,
    features: ProxyFeatures | None = None,
    network: DVN | None = None,
    period: int = 10,
    num_samples: int = 20,
    step_size: float = 1e-3,
    target: Target = "exact",
    normalization: Normalization = "softmax",
    temperature: float = 1.0,
    learning_rate: float = 1e-3,
    fit_steps: int = 5,
    memory: int | None = None,
    standardize_targets: bool = True,
    refresh_every: int | None = None,
    compare_first_order: bool = False,
    name: str = "dvn",
) -> Method:
  """The DVN sampler: batches drawn with p proportional to exp(g_phi(h_i) / temperature) over the pool.

  Every `period` steps (from the first) it probes `num_samples` pool samples drawn uniformly without
  replacement: their features and true contributions at the current parameters (`contributions`
  against the step's validation batch, or their `first_order_contributions` with
  `target="first_order"`) join a memory of the last `memory` probes (default `2 * num_samples`), and
  the DVN takes `fit_steps` Adam steps on the mean squared error over that memory. The contributions
  are z-scored over the memory when `standardize_targets` (so that scores, and `temperature`, are in
  units of their spread); features are always z-scored over the pool. `fit_steps=1, memory=num_samples,
  standardize_targets=False` is the paper's literal update. Batches are weighted uniformly.

  Args:
    model, loss_fn: the model being trained and its per-sample loss.
    features: the proxy features (default `proxy_features(model, loss_fn)`).
    network: the DVN module (default `DVN()`: 2 x 128, ReLU).
    period: T, steps between meta-updates (>= 1).
    num_samples: K, samples probed per meta-update; at most the pool size.
    step_size: eta of the one-step SGD update that defines a contribution.
    target: "exact" (`contributions`) or "first_order".
    normalization: "softmax", or "none" for the un-normalised ablation (see `sampling_probs`).
    temperature: softmax temperature.
    learning_rate: the DVN's Adam step size.
    fit_steps: Adam steps per meta-update.
    memory: probes kept for the fit.
    standardize_targets: z-score the contributions over the memory.
    refresh_every: re-measure the whole pool's features every this many steps (None: only at step 0).
    compare_first_order: also compute the probes' first-order estimates and log their Spearman
      correlation with the true contributions as "dvn/first_order_spearman" (NaN when off; it costs a
      validation gradient per meta-update).
    name: label in logs.
  """
  features = features or proxy_features(model, loss_fn)
  network = network or DVN()
  memory = 2 * num_samples if memory is None else memory
  for option, value in (("period", period), ("num_samples", num_samples), ("fit_steps", fit_steps), ("memory", memory)):
    checks.check_int(option, value)
  checks.check_int("refresh_every", refresh_every, allow_none=True)
  if memory < num_samples:
    raise ValueError(
        f"memory={memory} cannot hold one meta-update's num_samples={num_samples}; expected memory >= num_samples"
    )
  for option, value in (("step_size", step_size), ("temperature", temperature), ("learning_rate", learning_rate)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < np.inf:
      raise ValueError(f"{option} must be a positive finite number, got {value!r}")
  if target not in ("exact", "first_order"):
    raise ValueError(f"unknown target {target!r}; expected 'exact' or 'first_order'")
  sampling_probs(jnp.zeros((1,)), normalization, temperature)  # rejects an unknown normalization
  num_features = len(features.names)
  optimizer = optax.adam(learning_rate)

  def score(dvn_state: DVNState, table: jax.Array) -> jax.Array:  # (N, F) -> (N,)
    inputs = (table - dvn_state.feature_mean) / dvn_state.feature_scale
    return network.apply({"params": dvn_state.params}, inputs)

  def init(key, num_train):
    if num_samples > num_train:
      raise ValueError(
          f"num_samples={num_samples} is larger than the training pool ({num_train} samples); expected at most"
          " the pool size"
      )
    params = network.init(key, jnp.zeros((1, num_features), jnp.float32))["params"]
    zero = jnp.zeros((), jnp.float32)
    dvn_state = DVNState(
        params=params,
        opt_state=optimizer.init(params),
        feature_mean=jnp.zeros((num_features,), jnp.float32),
        feature_scale=jnp.ones((num_features,), jnp.float32),
        target_mean=zero,
        target_scale=jnp.ones((), jnp.float32),
        memory_features=jnp.zeros((memory, num_features), jnp.float32),
        memory_targets=jnp.zeros((memory,), jnp.float32),
        memory_count=jnp.zeros((), jnp.int32),
        spearman=jnp.full((), jnp.nan, jnp.float32),
        first_order_spearman=jnp.full((), jnp.nan, jnp.float32),
        fit_loss=jnp.full((), jnp.nan, jnp.float32),
    )
    return SamplerState(
        features=jnp.zeros((num_train, num_features), jnp.float32),
        scores=jnp.zeros((num_train,), jnp.float32),
        step=jnp.zeros((), jnp.int32),
        dvn=dvn_state,
    )

  def fit(dvn_state: DVNState) -> DVNState:
    """`fit_steps` Adam steps on the squared error over the filled part of the memory."""
    filled = jnp.arange(memory) < dvn_state.memory_count  # (M,)
    count = jnp.sum(filled)
    targets = dvn_state.memory_targets
    if standardize_targets:
      mean = jnp.sum(jnp.where(filled, targets, 0.0)) / count
      spread = jnp.sqrt(jnp.sum(jnp.where(filled, jnp.square(targets - mean), 0.0)) / count)
      dvn_state = dvn_state._replace(target_mean=mean, target_scale=jnp.where(spread > 0, spread, 1.0))
    scaled = (targets - dvn_state.target_mean) / dvn_state.target_scale
    inputs = (dvn_state.memory_features - dvn_state.feature_mean) / dvn_state.feature_scale

    def regression_loss(params):
      errors = network.apply({"params": params}, inputs) - scaled
      return jnp.sum(jnp.where(filled, jnp.square(errors), 0.0)) / count

    def adam_step(_, carry):
      params, opt_state = carry
      grads = jax.grad(regression_loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.fori_loop(0, fit_steps, adam_step, (dvn_state.params, dvn_state.opt_state))
    return dvn_state._replace(params=params, opt_state=opt_state, fit_loss=regression_loss(params))

  def meta_update(dvn_state: DVNState, table: jax.Array, ctx: StepContext) -> DVNState:
    """Probe K pool samples, remember their (features, contribution) pairs, and refit the DVN."""
    rows = jax.random.choice(ctx.key, ctx.train_x.shape[0], (num_samples,), replace=False)
    x, y = ctx.train_x[rows], ctx.train_y[rows]
    tape = persample.record(model, ctx.params, x, y, loss_fn)  # one pass serves features and contributions
    probed = features.from_tape(ctx.params, tape, x, y, rows)  # (K, F)
    estimate = None  # the first-order estimates (K,), computed once when the target or the comparison needs them
    if target == "first_order" or compare_first_order:
      estimate = first_order_contributions(model, loss_fn, ctx.params, x, y, ctx.val_x, ctx.val_y, step_size)
    if target == "exact":
      true = contributions(model, loss_fn, ctx.params, x, y, ctx.val_x, ctx.val_y, step_size, tape=tape)  # (K,)
    else:
      true = estimate
    predicted = score(dvn_state, probed)
    slots = (dvn_state.memory_count + jnp.arange(num_samples)) % memory
    mean = jnp.mean(table, axis=0)
    spread = jnp.std(table, axis=0)
    dvn_state = dvn_state._replace(
        feature_mean=mean,
        feature_scale=jnp.where(spread > 0, spread, 1.0),
        memory_features=dvn_state.memory_features.at[slots].set(probed),
        memory_targets=dvn_state.memory_targets.at[slots].set(true),
        memory_count=dvn_state.memory_count + num_samples,
        spearman=spearman(predicted, true),
    )
    if compare_first_order:
      dvn_state = dvn_state._replace(first_order_spearman=spearman(estimate, true))
    return fit(dvn_state)

  def weights(state: SamplerState, ctx: StepContext):
    table, refreshed = _pool_table(state, ctx, features, refresh_every)
    probe = state.step % period == 0
    dvn_state = jax.lax.cond(probe, meta_update, lambda d, t, c: d, state.dvn, table, ctx)
    scores = jax.lax.cond(probe | refreshed, lambda: score(dvn_state, table), lambda: state.scores)
    metrics = {
        "dvn/spearman": dvn_state.spearman,
        "dvn/first_order_spearman": dvn_state.first_order_spearman,
        "dvn/fit_loss": dvn_state.fit_loss,
        "dvn/probed": probe.astype(jnp.float32),
    }
    return _uniform_weights(ctx.batch.y.shape[0]), SamplerState(table, scores, state.step, dvn_state), metrics

  def update(state: SamplerState, ctx: StepContext, result: StepResult):
    rows = _batch_rows(features, ctx, result)  # (B, F)
    new_state = SamplerState(
        state.features.at[ctx.batch.indices].set(rows),
        state.scores.at[ctx.batch.indices].set(score(state.dvn, rows)),
        state.step + 1,
        state.dvn,
    )
    return new_state, _pool_diagnostics(probs(new_state))

  def probs(state: SamplerState) -> jax.Array:
    return sampling_probs(state.scores, normalization, temperature)

  return Method(init, weights, update, probs=probs, name=name)


def grad_norm_sampler(
    model: nn.Module,
    loss_fn: persample.LossFn,
    *,
    refresh_every: int | None = None,
    name: str = "grad-norm",
) -> Method:
  """The gradient-norm baseline: batches drawn with p_i proportional to each sample's gradient norm.

  The norms are a table kept as in `dvn` (the pool at step 0, then each batch's rows); batches are
  weighted uniformly. Uniform over the pool while every norm is zero.
  """
  checks.check_int("refresh_every", refresh_every, allow_none=True)
  features = proxy_features(model, loss_fn, include=("grad_norm",))

  def init(key, num_train):
    return SamplerState(
        features=jnp.zeros((num_train, 1), jnp.float32),
        scores=jnp.zeros((num_train,), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )

  def weights(state: SamplerState, ctx: StepContext):
    table, _ = _pool_table(state, ctx, features, refresh_every)
    return _uniform_weights(ctx.batch.y.shape[0]), SamplerState(table, table[:, 0], state.step), {}

  def update(state: SamplerState, ctx: StepContext, result: StepResult):
    table = state.features.at[ctx.batch.indices].set(_batch_rows(features, ctx, result))
    new_state = SamplerState(table, table[:, 0], state.step + 1)
    return new_state, _pool_diagnostics(probs(new_state))

  def probs(state: SamplerState) -> jax.Array:
    return sampling_probs(state.scores, "none")

  return Method(init, weights, update, probs=probs, name=name)
