"""Data Valuation Network (DVN): a sampler that learns which samples lower the validation loss.

A small MLP g_phi maps each training sample's cheap proxy features h_i (per-sample loss, gradient
norm, embedding norm) to a score s_i, and the next batch is drawn with p_i proportional to
exp(s_i / temperature) over the training pool. Every `period` steps, `num_samples` (K) samples drawn
uniformly from the pool are probed: their true one-step contribution

    Delta_i = L_val(theta) - L_val(theta - eta grad l_i(theta))

is measured for all K at once (`contributions`, one `vmap`), and g_phi is regressed on a replay memory
of the probes with Adam. `first_order_contributions` gives the estimate eta <grad l_i, grad L_val>.

The pieces compose: a pool feature table (`samplers.table_sampler`, refreshed from each training step's
own tape), a `ReplayMemory`, the value `Regressor`, and a pure `probe`. `dvn` is a table sampler that
scores with the regressor and learns from probes; `grad_norm_sampler` is the same table sampler scoring
by the gradient-norm column. The proxy features and the sampler pieces are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from metasel import checks, parallel, persample
from metasel.adapters import ModelLike
from metasel.contributions import contributions, first_order_contributions, spearman
from metasel.core import Method, StepContext, check_pool
from metasel.numerics import nonzero_scale
from metasel.samplers import (
    PROXY_FEATURES, Normalization, ProxyFeatures, SamplerState, proxy_features, sampling_probs, table_sampler,
    table_signal,
)
from metasel.records import valued

__all__ = [
    "PROXY_FEATURES",
    "ProxyFeatures",
    "proxy_features",
    "table_signal",
    "DVN",
    "sampling_probs",
    "contributions",
    "first_order_contributions",
    "spearman",
    "ReplayMemory",
    "memory_init",
    "memory_add",
    "Regressor",
    "regressor_init",
    "regressor_score",
    "regressor_fit",
    "Probe",
    "probe",
    "learn_from_probe",
    "SamplerState",
    "table_sampler",
    "DVNState",
    "dvn",
    "grad_norm_sampler",
]

Params = Any
Target = Literal["exact", "first_order"]


# ----------------------------------------------------------------------------------------------------
# The network


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


# ----------------------------------------------------------------------------------------------------
# Replay memory and the value regressor


class ReplayMemory(NamedTuple):
  """The last M probes in a ring: features (M, F), measured contributions (M,), and how many were added."""

  features: jax.Array
  targets: jax.Array
  count: jax.Array


def memory_init(size: int, width: int) -> ReplayMemory:
  return ReplayMemory(jnp.zeros((size, width), jnp.float32), jnp.zeros((size,), jnp.float32), jnp.zeros((), jnp.int32))


def memory_add(memory: ReplayMemory, features: jax.Array, targets: jax.Array) -> ReplayMemory:
  """The memory with K new probes (K, F), (K,) written over the oldest."""
  slots = (memory.count + jnp.arange(targets.shape[0])) % memory.targets.shape[0]
  return ReplayMemory(memory.features.at[slots].set(features), memory.targets.at[slots].set(targets), memory.count + targets.shape[0])


def memory_filled(memory: ReplayMemory) -> jax.Array:
  """Which slots (M,) hold a probe."""
  return jnp.arange(memory.targets.shape[0]) < memory.count


class Regressor(NamedTuple):
  """The value network's parameters and Adam state, with the standardisation of its inputs and targets.

  Features are z-scored with the pool's mean and spread at the last probe; targets with the memory's.
  """

  params: Params
  opt_state: Any
  feature_mean: jax.Array
  feature_scale: jax.Array
  target_mean: jax.Array
  target_scale: jax.Array


def regressor_init(network: DVN, optimizer: optax.GradientTransformation, key: jax.Array, width: int) -> Regressor:
  params = network.init(key, jnp.zeros((1, width), jnp.float32))["params"]
  return Regressor(
      params, optimizer.init(params), jnp.zeros((width,), jnp.float32), jnp.ones((width,), jnp.float32),
      jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32),
  )


def regressor_score(network: DVN, regressor: Regressor, features: jax.Array) -> jax.Array:
  """Predicted (standardised) contributions (N,) of samples with features (N, F)."""
  return network.apply({"params": regressor.params}, (features - regressor.feature_mean) / regressor.feature_scale)


def regressor_fit(
    network: DVN, optimizer: optax.GradientTransformation, regressor: Regressor, memory: ReplayMemory, *,
    steps: int, standardize_targets: bool,
) -> tuple[Regressor, jax.Array]:
  """`steps` Adam steps on the mean squared error over the filled part of the memory; returns the loss after."""
  filled = memory_filled(memory)  # (M,)
  count = jnp.sum(filled)
  if standardize_targets:
    mean = jnp.sum(jnp.where(filled, memory.targets, 0.0)) / count
    spread = jnp.sqrt(jnp.sum(jnp.where(filled, jnp.square(memory.targets - mean), 0.0)) / count)
    regressor = regressor._replace(target_mean=mean, target_scale=nonzero_scale(spread))
  scaled = (memory.targets - regressor.target_mean) / regressor.target_scale

  def loss(params):
    errors = regressor_score(network, regressor._replace(params=params), memory.features) - scaled
    return jnp.sum(jnp.where(filled, jnp.square(errors), 0.0)) / count

  def adam_step(_, carry):
    params, opt_state = carry
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = jax.lax.fori_loop(0, steps, adam_step, (regressor.params, regressor.opt_state))
  return regressor._replace(params=params, opt_state=opt_state), loss(params)


# ----------------------------------------------------------------------------------------------------
# Probes


class Probe(NamedTuple):
  """K probed pool samples: features (K, F), true contributions (K,), and first-order estimates (K,) when asked for."""

  features: jax.Array
  contributions: jax.Array
  first_order: jax.Array | None


def probe(
    model: ModelLike, loss_fn: persample.LossFn, features: ProxyFeatures, ctx: StepContext, rows: jax.Array,
    step_size: jax.Array, *, target: Target = "exact", first_order: bool = False,
) -> Probe:
  """Features and one-step contributions of the pool rows `rows` (K,) at the step's params and validation batch.

  One recorded tape serves the features and the exact contributions; the first-order estimates are
  computed when the target is "first_order" or `first_order` asks for them. Under a data mesh the K
  probes are split over its devices (K must divide over them).
  """
  # The K probes are split over the ambient data mesh (a no-op on one device).
  pool_x, pool_y = check_pool(ctx, "the DVN's probe")
  x, y = parallel.constrain_rows((pool_x[rows], pool_y[rows]), "num_samples (the DVN's K probes)")
  recorded = persample.record(model, ctx.params, x, y, loss_fn)
  probed = features.from_tape(ctx.params, recorded, x, y, rows)  # (K, F)
  estimate = None
  if target == "first_order" or first_order:
    estimate = first_order_contributions(model, loss_fn, ctx.params, x, y, ctx.val_x, ctx.val_y, step_size, tape=recorded)
  if target == "first_order":
    return Probe(probed, estimate, estimate if first_order else None)
  true = contributions(model, loss_fn, ctx.params, x, y, ctx.val_x, ctx.val_y, step_size, tape=recorded)
  return Probe(probed, true, estimate)


# ----------------------------------------------------------------------------------------------------
# The DVN and the gradient-norm baseline


class DVNState(NamedTuple):
  """The value regressor, its replay memory, its diagnostics and the traced hyperparameters.

  Attributes:
    regressor: the DVN's parameters, Adam state and standardisation.
    memory: the probes it is fitted on.
    spearman: rank correlation of predicted and true contributions at the last probe, before its fit.
    first_order_spearman: of the true contributions and their first-order estimates, same samples.
    fit_loss: the regression loss after the last fit.
    step_size: eta of the one-step update that defines a contribution.
    temperature: the softmax temperature of the sampling distribution.
  """

  regressor: Regressor
  memory: ReplayMemory
  spearman: jax.Array
  first_order_spearman: jax.Array
  fit_loss: jax.Array
  step_size: jax.Array
  temperature: jax.Array


def learn_from_probe(
    network: DVN, optimizer: optax.GradientTransformation, state: DVNState, table: jax.Array, found: Probe, *,
    fit_steps: int, standardize_targets: bool,
) -> DVNState:
  """The DVN after a probe: its prediction scored, the probe remembered, the pool restandardised, the regressor refit.

  The Spearman correlation of predicted and true contributions is taken before the fit, on samples the
  regressor has not seen; the first-order one when the probe has first-order estimates.
  """
  predicted = regressor_score(network, state.regressor, found.features)
  regressor = state.regressor._replace(feature_mean=jnp.mean(table, 0), feature_scale=nonzero_scale(jnp.std(table, 0)))
  memory = memory_add(state.memory, found.features, found.contributions)
  regressor, fit_loss = regressor_fit(network, optimizer, regressor, memory, steps=fit_steps, standardize_targets=standardize_targets)
  first = state.first_order_spearman if found.first_order is None else spearman(found.first_order, found.contributions)
  return state._replace(
      regressor=regressor, memory=memory, spearman=spearman(predicted, found.contributions),
      first_order_spearman=first, fit_loss=fit_loss,
  )


def _check_dvn_options(period, num_samples, fit_steps, memory, step_size, temperature, learning_rate, target, normalization):
  for option, value in (("period", period), ("num_samples", num_samples), ("fit_steps", fit_steps), ("memory", memory)):
    checks.check_int(option, value)
  if memory < num_samples:
    raise ValueError(f"memory={memory} cannot hold one meta-update's num_samples={num_samples}; expected memory >= num_samples")
  for option, value in (("step_size", step_size), ("temperature", temperature), ("learning_rate", learning_rate)):
    checks.check_positive(option, value)
  checks.check_choice("target", target, ("exact", "first_order"))
  checks.check_choice("normalization", normalization, ("softmax", "none"))


@valued
def dvn(
    model: ModelLike,
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
    optimizer: optax.GradientTransformation | None = None,
    fit_steps: int = 5,
    memory: int | None = None,
    standardize_targets: bool = True,
    refresh_every: int | None = None,
    compare_first_order: bool = False,
    name: str = "dvn",
) -> Method:
  """The DVN sampler: batches drawn with p proportional to exp(g_phi(h_i) / temperature) over the pool.

  Every `period` steps (from the first) it `probe`s `num_samples` pool samples drawn uniformly without
  replacement: their features and true contributions at the current parameters (`contributions`
  against the step's validation batch, or their `first_order_contributions` with
  `target="first_order"`) join a `ReplayMemory` of the last `memory` probes (default `2 * num_samples`),
  and the `Regressor` takes `fit_steps` Adam steps on the mean squared error over it. Contributions are
  z-scored over the memory when `standardize_targets` (so that scores, and `temperature`, are in units of
  their spread); features are always z-scored over the pool. `fit_steps=1, memory=num_samples,
  standardize_targets=False` is the paper's literal update. `step_size` and `temperature` are traced
  state (`DVNState`). Batches are weighted uniformly.

  Args:
    model: the model being trained (any Flax model).
    loss_fn: its per-sample loss.
    features: the proxy features (default `proxy_features(model, loss_fn)`).
    network: the DVN module (default `DVN()`: 2 x 128, ReLU).
    period: T, steps between meta-updates (>= 1).
    num_samples: K, samples probed per meta-update; at most the pool size.
    step_size: eta of the one-step SGD update that defines a contribution.
    target: "exact" (`contributions`) or "first_order".
    normalization: "softmax", or "none" for the un-normalised ablation (see `sampling_probs`).
    temperature: softmax temperature.
    learning_rate: the DVN's Adam step size.
    optimizer: any optax optimiser for the DVN instead (then `learning_rate` does not apply).
    fit_steps: optimiser steps per meta-update.
    memory: probes kept for the fit.
    standardize_targets: z-score the contributions over the memory.
    refresh_every: re-measure the whole pool's features every this many steps (None: only at step 0).
    compare_first_order: also compute the probes' first-order estimates and log their Spearman correlation
      with the true contributions as "dvn/first_order_spearman" (NaN when off).
    name: label in logs.
  """
  features = features or proxy_features(model, loss_fn)
  network = network or DVN()
  memory = 2 * num_samples if memory is None else memory
  _check_dvn_options(period, num_samples, fit_steps, memory, step_size, temperature, learning_rate, target, normalization)
  optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
  nan = jnp.full((), jnp.nan, jnp.float32)

  def learner_init(key, num_train) -> DVNState:
    if num_samples > num_train:
      raise ValueError(
          f"num_samples={num_samples} is larger than the training pool ({num_train} samples); expected at most the pool size"
      )
    return DVNState(
        regressor_init(network, optimizer, key, features.width), memory_init(memory, features.width), nan, nan, nan,
        jnp.asarray(step_size, jnp.float32), jnp.asarray(temperature, jnp.float32),
    )

  def meta_update(state: DVNState, table: jax.Array, ctx: StepContext) -> DVNState:
    """Probe K pool samples drawn uniformly without replacement, then learn from them."""
    rows = jax.random.choice(ctx.key, check_pool(ctx, name)[0].shape[0], (num_samples,), replace=False)
    found = probe(model, loss_fn, features, ctx, rows, state.step_size, target=target, first_order=compare_first_order)
    return learn_from_probe(
        network, optimizer, state, table, found, fit_steps=fit_steps, standardize_targets=standardize_targets
    )

  def report(state: DVNState, probed: jax.Array):
    return {
        "dvn/spearman": state.spearman,
        "dvn/first_order_spearman": state.first_order_spearman,
        "dvn/fit_loss": state.fit_loss,
        "dvn/probed": probed.astype(jnp.float32),
    }

  def distribution(state: DVNState, scores: jax.Array) -> jax.Array:
    return sampling_probs(scores, normalization, state.temperature)

  def score(state: DVNState, table):
    return regressor_score(network, state.regressor, table)

  return table_sampler(
      features, score, distribution, learner_init=learner_init, learn=meta_update, learn_every=period, report=report,
      refresh_every=refresh_every, name=name,
  )


@valued
def grad_norm_sampler(
    model: ModelLike, loss_fn: persample.LossFn, *, refresh_every: int | None = None, name: str = "grad-norm"
) -> Method:
  """The gradient-norm baseline: batches drawn with p_i proportional to each sample's gradient norm.

  A `table_sampler` of the norms (the pool at step 0, then each batch's rows from the step's tape),
  uniform over the pool while every norm is zero.
  """
  return table_sampler(
      proxy_features(model, loss_fn, include=("grad_norm",)),
      lambda learner, table: table[:, 0],
      lambda learner, scores: sampling_probs(scores, "none"),
      refresh_every=refresh_every,
      name=name,
  )
