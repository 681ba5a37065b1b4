"""Static front-loading (a curriculum) and its random-order control.

The pool is sorted once by a score (from a short pilot run or any signal table); at step t only the
first g(t) N samples of that order are available, g(t) = min(1, g0 + (1 - g0) t / T_ramp), and batches
are drawn uniformly (with replacement) inside them. The random-order control uses the same pacing over
a shuffled order, so that what the order adds can be told from what the growing pool size adds (Wu et
al. 2021, "When do curricula work?").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metasel import checks
from metasel.controllers import scores as scoring
from metasel.core import Method, StepContext, StepResult, uniform_weights
from metasel.records import valued

__all__ = ["CurriculumState", "curriculum", "random_order_curriculum", "available_probs"]


class CurriculumState(NamedTuple):
  """Each pool sample's position in the curriculum order (N,) (0 comes first) and the step."""

  positions: jax.Array
  step: jax.Array


def available_probs(positions: jax.Array, step: jax.Array, start: float, ramp_steps: int) -> jax.Array:
  """Uniform over the first ceil(g(t) N) samples of the order (N,), zero elsewhere."""
  n = positions.shape[0]
  # The tolerance keeps float32 rounding of g(t) N from adding a sample at exact multiples.
  available = jnp.maximum(jnp.ceil(scoring.pacing(step, start, ramp_steps) * n - 1e-3), 1.0)
  inside = (positions < available).astype(jnp.float32)
  return inside / jnp.sum(inside)


@valued
def _paced(positions: jax.Array | None, start: float, ramp_steps: int, name: str) -> Method:
  """The pacing over `positions` (N,) of the pool, or over a random order drawn from the key when None."""
  scoring.check_pacing(start, ramp_steps)

  def init(key, num_train):
    if positions is None:
      return CurriculumState(jax.random.permutation(key, num_train).astype(jnp.int32), jnp.zeros((), jnp.int32))
    if num_train != positions.shape[0]:
      raise ValueError(f"curriculum scores cover {positions.shape[0]} samples, but the pool has {num_train}")
    return CurriculumState(positions, jnp.zeros((), jnp.int32))

  def weights(state: CurriculumState, ctx: StepContext):
    share = scoring.pacing(state.step, start, ramp_steps)
    return uniform_weights(ctx.batch.y.shape[0]), (), {"curriculum/available": share}

  def update(state: CurriculumState, ctx: StepContext, result: StepResult, carry):
    return state._replace(step=state.step + 1), {}

  def probs(state: CurriculumState) -> jax.Array:
    return available_probs(state.positions, state.step, start, ramp_steps)

  return Method(init, weights, update, probs=probs, name=name, needs_validation=False)


def curriculum(scores, *, ramp_steps: int, start: float = 0.2, easy_first: bool = True, name: str = "curriculum") -> Method:
  """Static front-loading: the pool sorted once by `scores` (N,) (low first when `easy_first`), exposed by the pacing.

  Bias: during the ramp the model trains on a subset chosen by the score, which changes the objective
  (towards the easy part when `easy_first`); from T_ramp on it is uniform sampling with replacement.
  """
  values = np.asarray(scores, np.float64)
  if values.ndim != 1:
    raise ValueError(f"curriculum scores must have shape (N,), one per pool sample; got {values.shape}")
  checks.check_finite_rows("curriculum scores", values)
  order = np.argsort(values if easy_first else -values, kind="stable")
  positions = np.empty(values.size, np.int32)
  positions[order] = np.arange(values.size, dtype=np.int32)

  return _paced(jnp.asarray(positions), float(start), ramp_steps, name)


def random_order_curriculum(*, ramp_steps: int, start: float = 0.2, name: str = "curriculum-random-order") -> Method:
  """The curriculum's control: the same pacing over a random order drawn from the method's key.

  Bias: as the curriculum's, but the subset seen during the ramp is a uniform random one: within a run it
  trains on that fixed subset, and only averaged over orders is the expected gradient the full pool's.
  """
  return _paced(None, float(start), ramp_steps, name)
