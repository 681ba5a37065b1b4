"""Samplers over the training pool from a table of per-sample features, kept fresh by the training step's own tape.

`proxy_features` are cheap per-sample features (loss, ghost gradient norm, embedding norm, any named
signal) read off a `tape.Tape`; `table_sampler` keeps every pool sample's features as last measured (the
whole pool at the first step, then each batch's rows from the step's own forward and backward pass, so
they cost no extra pass), scores them, and draws batches from `sampling_probs` of the scores, kept in
its state. The DVN (`metasel.dvn`) and the gradient-norm baseline are table samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, persample, records
from metasel.adapters import ModelLike
from metasel.core import Method, Metrics, StepContext, StepResult, check_pool, uniform_weights
from metasel.numerics import safe_divide
from metasel.tape import Tape
from metasel.records import valued

__all__ = [
    "PROXY_FEATURES",
    "ExtraSignal",
    "ProxyFeatures",
    "proxy_features",
    "table_signal",
    "Normalization",
    "sampling_probs",
    "SamplerState",
    "Learn",
    "table_sampler",
]

Params = Any
Normalization = Literal["softmax", "none"]
PROXY_FEATURES = ("loss", "grad_norm", "embedding_norm")
ExtraSignal = Callable[[Tape, jax.Array, jax.Array], jax.Array]  # (tape, y (B,), rows (B,)) -> (B,)


# ----------------------------------------------------------------------------------------------------
# Proxy features


class ProxyFeatures(NamedTuple):
  """Named per-sample features (B, len(names)) of samples x (B, ...), y (B,) at pool indices rows (B,).

  `fn(params, x, y, rows)` runs the model for them; `from_tape(params, tape, x, y, rows)` reads them off
  a `tape.Tape` of that batch, such as the training step's own (`core.StepResult.tape`).
  """

  names: tuple[str, ...]
  fn: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]
  from_tape: Callable[[Params, Tape, jax.Array, jax.Array, jax.Array], jax.Array]

  @property
  def width(self) -> int:
    return len(self.names)


@valued
def proxy_features(
    model: ModelLike,
    loss_fn: persample.LossFn,
    *,
    include: Sequence[str] = PROXY_FEATURES,
    extra: Mapping[str, ExtraSignal] | None = None,
) -> ProxyFeatures:
  """The DVN's cheap per-sample features, from one forward and one backward pass to the layer outputs.

  Args:
    model: any Flax model (`metasel.adapters`).
    loss_fn: per-sample loss.
    include: any of "loss", "grad_norm" (exact, by the ghost identity) and "embedding_norm", in order.
    extra: more named signals `(tape, targets, rows) -> (B,)` from the same `tape.Tape` and the samples'
      pool indices, e.g. `{"margin": lambda tape, y, rows: signals.margin(tape.outputs, y)}`, or a
      per-sample table through `table_signal`.
  """
  include = tuple(include)
  extra = dict(extra or {})
  if any(name not in PROXY_FEATURES for name in include) or len(set(include)) != len(include):
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
        "embedding_norm": lambda: jnp.linalg.norm(_embeddings_of(tape), axis=-1),
    }
    values = [columns[name]() for name in include] + [signal(tape, y, rows) for signal in extra.values()]
    return jnp.stack([jnp.asarray(v, jnp.float32).reshape(-1) for v in values], axis=-1)  # (B, F)

  def fn(params, x, y, rows):
    return from_tape(params, persample.record(model, params, x, y, loss_fn), x, y, rows)

  return ProxyFeatures(names, fn, from_tape)


def _embeddings_of(tape: Tape) -> jax.Array:
  if tape.embeddings is None:
    raise ValueError("the embedding_norm feature needs an embedding; the model has no dense layer and returns none")
  return tape.embeddings


def table_signal(table, name: str = "table") -> ExtraSignal:
  """A fixed per-sample signal (N,) of the pool (e.g. a training-dynamics summary) as an extra feature.

  The table is checked for NaN and inf here, before any compute.
  """
  table = jnp.asarray(table, jnp.float32)
  if table.ndim != 1:
    raise ValueError(f"{name} must have shape (N,), one value per pool sample, got shape {table.shape}")
  checks.check_finite_rows(name, table)
  return records.recipe(_table_signal, table=table)


def _table_signal(table: jax.Array) -> ExtraSignal:
  return lambda tape, y, rows: table[rows]


# ----------------------------------------------------------------------------------------------------
# Sampling from scores


def sampling_probs(scores: jax.Array, normalization: Normalization = "softmax", temperature: jax.Array | float = 1.0) -> jax.Array:
  """Sampling distribution (N,) over the pool from scores (N,).

  "softmax": p_i proportional to exp(s_i / temperature). "none" (the ablation): the scores used as
  weights directly, p_i proportional to max(s_i, 0), and uniform while no score is positive.
  """
  if normalization == "softmax":
    return jax.nn.softmax(scores / temperature)
  if normalization == "none":
    weights = jnp.maximum(scores, 0.0)
    return safe_divide(weights, jnp.sum(weights), 1.0 / scores.shape[0])
  raise ValueError(f"unknown normalization {normalization!r}; expected 'softmax' or 'none'")


# ----------------------------------------------------------------------------------------------------
# The table sampler


class SamplerState(NamedTuple):
  """A table sampler's state: pool features (N, F) as last measured, scores (N,), their sampling distribution (N,),
  the step, and its learner.

  The distribution is normalised once per step, after the step's rows are rescored; the next batch is
  drawn from it and the pool diagnostics read it, without normalising the scores again.
  """

  features: jax.Array
  scores: jax.Array
  probs: jax.Array
  step: jax.Array
  learner: Any = ()


def _pool_diagnostics(probs: jax.Array) -> Metrics:
  """Effective number of pool samples 1 / sum p_i^2 and the largest probability of the sampler."""
  return {"sampler/pool_ess": 1.0 / jnp.sum(jnp.square(probs)), "sampler/max_prob": jnp.max(probs)}


def _every(step: jax.Array, period: int | None) -> jax.Array:
  """Whether work done every `period` steps (None: only at step 0) is due at `step`."""
  return step == 0 if period is None else step % period == 0


def _ordered_after(weights: jax.Array, values: jax.Array) -> jax.Array:
  """The same weights, made data-dependent on `values` (0 times a comparison adds +0.0, also for NaN).

  The model's step consumes the weights, so XLA orders its in-place parameter update after the
  pool-wide work that produced `values` and read the old parameters, instead of copying the
  parameters every step to keep them for that work.
  """
  return weights + 0.0 * (values[0] > 0).astype(weights.dtype)


Learn = Callable[[Any, jax.Array, StepContext], Any]


@valued
def table_sampler(
    features: ProxyFeatures,
    score: Callable[[Any, jax.Array], jax.Array],
    distribution: Callable[[Any, jax.Array], jax.Array],
    *,
    learner_init: Callable[[jax.Array, int], Any] = lambda key, n: (),
    learn: Learn | None = None,
    learn_every: int = 1,
    report: Callable[[Any, jax.Array], Metrics] = lambda learner, learned: {},
    refresh_every: int | None = None,
    name: str = "table-sampler",
) -> Method:
  """A sampler over the pool from a table of every sample's `features`, as last measured, and a score of them.

  The whole pool is measured at step 0 (and every `refresh_every` steps), and each batch's rows at every
  step from the training step's own tape. `score(learner, table (N, F)) -> (N,)` turns features into
  scores and `distribution(learner, scores) -> (N,)` scores into the sampling distribution. A
  `learn(learner, table, ctx) -> learner` runs before every `learn_every`-th step (the DVN's probes),
  and `report(learner, learned) -> metrics` gives the step's metrics of the learner. Batches are
  weighted uniformly.

  Only the work that changes runs in a step: the pool-wide work (measuring the pool, learning, and
  rescoring the whole table with the learner) runs under one `lax.cond` on the steps it is due, and
  every step rescores its own rows and normalises the scores once into the distribution kept in the
  state, which the training loop draws from and the pool diagnostics read.
  """
  checks.check_int("refresh_every", refresh_every, allow_none=True)
  checks.check_int("learn_every", learn_every)

  def init(key, num_train):
    learner = learner_init(key, num_train)
    scores = jnp.zeros((num_train,), jnp.float32)
    features_table = jnp.zeros((num_train, features.width), jnp.float32)
    return SamplerState(features_table, scores, distribution(learner, scores), jnp.zeros((), jnp.int32), learner)

  def pool_work(state: SamplerState, ctx: StepContext, refresh: jax.Array, learning: jax.Array) -> SamplerState:
    """The table measured anew (when due), the learner's update (when due), and the whole pool rescored."""
    pool_x, pool_y = check_pool(ctx, name)
    rows = jnp.arange(pool_x.shape[0])
    table = jax.lax.cond(refresh, lambda: features.fn(ctx.params, pool_x, pool_y, rows), lambda: state.features)
    learner = state.learner
    if learn is not None:
      learner = jax.lax.cond(learning, lambda: learn(state.learner, table, ctx), lambda: state.learner)
    return state._replace(features=table, scores=score(learner, table), learner=learner)

  def weights(state: SamplerState, ctx: StepContext):
    check_pool(ctx, name)
    refresh = _every(state.step, refresh_every)
    learning = jnp.asarray(learn is not None) & _every(state.step, learn_every)
    proposed = jax.lax.cond(refresh | learning, lambda: pool_work(state, ctx, refresh, learning), lambda: state)
    weights = _ordered_after(uniform_weights(ctx.batch.y.shape[0]), proposed.scores)
    return weights, proposed, report(proposed.learner, learning)

  def update(state: SamplerState, ctx: StepContext, result: StepResult, proposed: SamplerState):
    batch = ctx.batch
    if result.tape is None:
      rows = features.fn(ctx.params, batch.x, batch.y, batch.indices)
    else:
      rows = features.from_tape(ctx.params, result.tape, batch.x, batch.y, batch.indices)  # (B, F)
    scores = proposed.scores.at[batch.indices].set(score(proposed.learner, rows))
    probs = distribution(proposed.learner, scores)  # the one normalisation of the step
    new_state = proposed._replace(
        features=proposed.features.at[batch.indices].set(rows), scores=scores, probs=probs, step=proposed.step + 1
    )
    return new_state, _pool_diagnostics(probs)

  return Method(
      init, weights, update, probs=lambda state: state.probs, name=name, needs_pool=True, needs_validation=learn is not None
  )
