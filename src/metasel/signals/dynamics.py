"""Training dynamics in the optax manner: a tracker of O(N) running per-sample moments (loss, forgetting,
stability, cartography confidence, EL2N) updated batch by batch, and the MTS dynamics features from it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metasel import checks, numerics
from metasel.signals import _common, outputs

__all__ = ["TrackerState", "tracker_init", "tracker_update", "tracker_summary", "training_dynamics_features"]


class TrackerState(NamedTuple):
  """Running per-sample statistics over a pool of N samples; every field has shape (N,).

  Loss moments count every observation; the classification fields count only updates that were
  given logits and labels (`cls_count` of them per sample). Means and second moments are merged
  with Chan et al.'s pairwise update, which stays accurate in float32 over long runs.

  Attributes:
    count: observations of each sample.
    loss_mean: mean loss.
    loss_m2: sum of squared deviations of the loss from its mean.
    loss_cm: sum over observations of (t - mean t)(loss - mean loss), t = 0, 1, 2, ... the
      sample's own observation index; the least-squares slope is loss_cm / sum (t - mean t)^2.
    cls_count: observations with logits and labels.
    correct_count: observations whose argmax prediction equalled the label.
    forgetting: correct -> incorrect transitions between consecutive observations.
    unchanged: consecutive observation pairs whose argmax prediction did not change.
    last_correct: whether the latest observation was correct.
    last_pred: argmax prediction at the latest observation.
    conf_mean: mean true-class probability (dataset-cartography confidence).
    conf_m2: sum of squared deviations of the true-class probability.
    el2n_mean: mean EL2N score.
  """

  count: jax.Array
  loss_mean: jax.Array
  loss_m2: jax.Array
  loss_cm: jax.Array
  cls_count: jax.Array
  correct_count: jax.Array
  forgetting: jax.Array
  unchanged: jax.Array
  last_correct: jax.Array
  last_pred: jax.Array
  conf_mean: jax.Array
  conf_m2: jax.Array
  el2n_mean: jax.Array


_TRACKER_DTYPES = {
    "count": jnp.int32,
    "cls_count": jnp.int32,
    "correct_count": jnp.int32,
    "forgetting": jnp.int32,
    "unchanged": jnp.int32,
    "last_correct": jnp.bool_,
    "last_pred": jnp.int32,
}


def tracker_init(num_samples: int) -> TrackerState:
  """An empty tracker for a pool of `num_samples` samples (O(N) memory).

  Args:
    num_samples: pool size N.

  Returns:
    TrackerState of (N,) zero arrays.
  """
  checks.check_int("num_samples", num_samples)
  # Every field gets its own buffer, so the whole state can be donated to a jitted update.
  return TrackerState(
      *(jnp.zeros((num_samples,), _TRACKER_DTYPES.get(f, jnp.float32)) for f in TrackerState._fields)
  )


def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
  """Pairwise merge of (count, mean, M2) moments; returns (delta, mean, M2) with delta = mean_b - mean_a."""
  n = n_a + n_b
  delta = mean_b - mean_a
  frac_b = n_b / jnp.maximum(n, 1.0)
  return delta, mean_a + delta * frac_b, m2_a + m2_b + jnp.square(delta) * n_a * frac_b


class _Groups(NamedTuple):
  """A batch sorted (stably) by pool index and cut into groups of equal indices; fields are (B,)."""

  order: jax.Array  # batch position of each sorted element
  idx: jax.Array  # sorted pool indices
  group: jax.Array  # group number of each element, 0, 1, ...
  rank: jax.Array  # float32 position of each element within its group, 0 for the first
  size: jax.Array  # float32 size of each element's group
  dst: jax.Array  # where the element writes: its pool index if it is the last of its group, else N


def _segment_total(x: jax.Array, group: jax.Array) -> jax.Array:
  """Per-element sum of `x` over the elements of its group (`group` sorted, one number per element)."""
  return jax.ops.segment_sum(x, group, num_segments=group.shape[0], indices_are_sorted=True)[group]


def _group_sum(g: _Groups, x: jax.Array) -> jax.Array:
  """Per-element sum of `x` over the element's group of equal indices."""
  return _segment_total(x, g.group)


def _group_batch(indices: jax.Array, num_samples: int) -> _Groups:
  """Sort a batch of pool indices and find its groups of duplicates, in O(B log B) with no loop."""
  b = indices.shape[0]
  order = jnp.argsort(indices, stable=True)
  idx = indices[order]
  pos = jnp.arange(b)
  is_first = jnp.concatenate([jnp.ones((min(b, 1),), bool), idx[1:] != idx[:-1]])
  is_last = jnp.concatenate([idx[1:] != idx[:-1], jnp.ones((min(b, 1),), bool)])
  group = jnp.cumsum(is_first) - 1
  rank = (pos - jax.lax.cummax(jnp.where(is_first, pos, 0))).astype(jnp.float32)
  size = _segment_total(jnp.ones((b,), jnp.float32), group)
  # Only the last element of each group writes; the others are sent out of range and dropped.
  return _Groups(order, idx, group, rank, size, jnp.where(is_last, idx, num_samples))


def _group_moments(g: _Groups, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Group mean, group M2 and each element's deviation from its group mean, per element."""
  mean = _group_sum(g, x) / g.size
  return mean, _group_sum(g, jnp.square(x - mean)), x - mean


def _write(g: _Groups, field: jax.Array, value: jax.Array) -> jax.Array:
  """`field` with each group's value (taken from its last element) stored at its pool index."""
  return field.at[g.dst].set(value.astype(field.dtype), mode="drop")


def _record_losses(state: TrackerState, g: _Groups, losses: jax.Array) -> TrackerState:
  """`state` with the batch's losses merged into the loss moments and observation counts."""
  loss = _common.as_float(losses)[g.order].astype(jnp.float32)
  n_a = state.count[g.idx].astype(jnp.float32)
  mean_b, m2_b, dev = _group_moments(g, loss)
  cm_b = _group_sum(g, (g.rank - (g.size - 1.0) / 2.0) * dev)
  # For t = 0..n-1 split into the first n_a and the last n_b, mean t differs by (n_a + n_b) / 2.
  delta, mean, m2 = _merge(n_a, state.loss_mean[g.idx], state.loss_m2[g.idx], g.size, mean_b, m2_b)
  cm = state.loss_cm[g.idx] + cm_b + delta * n_a * g.size / 2.0
  return state._replace(
      count=_write(g, state.count, n_a + g.size),
      loss_mean=_write(g, state.loss_mean, mean),
      loss_m2=_write(g, state.loss_m2, m2),
      loss_cm=_write(g, state.loss_cm, cm),
  )


def _record_classification(
    state: TrackerState, g: _Groups, logits: jax.Array, labels: jax.Array
) -> TrackerState:
  """`state` with the batch's predictions merged into the forgetting, stability and cartography fields."""
  logits = _common.as_float(logits)[g.order]
  labels = labels[g.order]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  correct = pred == labels
  conf = outputs.true_class_prob(logits, labels).astype(jnp.float32)
  err = outputs.el2n(logits, labels).astype(jnp.float32)

  # The previous observation of each element: the one before it in its group, or the stored last one.
  first = g.rank == 0
  has_prev = jnp.where(first, state.cls_count[g.idx] > 0, True)
  prev_correct = jnp.where(first, state.last_correct[g.idx], jnp.roll(correct, 1))
  prev_pred = jnp.where(first, state.last_pred[g.idx], jnp.roll(pred, 1))
  forgot = has_prev & prev_correct & ~correct
  same = has_prev & (prev_pred == pred)

  def count(field, events):
    """`field` plus the number of `events` each sample had in this batch."""
    return _write(g, field, field[g.idx] + _group_sum(g, events.astype(jnp.int32)))

  c_a = state.cls_count[g.idx].astype(jnp.float32)
  conf_b, conf_m2_b, _ = _group_moments(g, conf)
  _, conf_mean, conf_m2 = _merge(c_a, state.conf_mean[g.idx], state.conf_m2[g.idx], g.size, conf_b, conf_m2_b)
  _, el2n_mean, _ = _merge(c_a, state.el2n_mean[g.idx], 0.0, g.size, _group_sum(g, err) / g.size, 0.0)
  return state._replace(
      cls_count=_write(g, state.cls_count, c_a + g.size),
      correct_count=count(state.correct_count, correct),
      forgetting=count(state.forgetting, forgot),
      unchanged=count(state.unchanged, same),
      last_correct=_write(g, state.last_correct, correct),
      last_pred=_write(g, state.last_pred, pred),
      conf_mean=_write(g, state.conf_mean, conf_mean),
      conf_m2=_write(g, state.conf_m2, conf_m2),
      el2n_mean=_write(g, state.el2n_mean, el2n_mean),
  )


def _check_update(num_samples: int, indices, losses, logits, labels) -> None:
  """Raise on tracker_update arguments of the wrong shape, pool indices out of range, or half a pair."""
  _common.check_rank(indices, 1, "indices", "(batch,)")
  _common.check_rank(losses, 1, "losses", "(batch,)")
  _common.check_same_batch(indices, losses, "indices", "losses")
  _common.check_index_range(indices, num_samples, "indices", "pool indices")
  if (logits is None) != (labels is None):
    raise ValueError("logits and labels must be given together (both or neither)")
  if logits is not None:
    _common.check_logits_labels(logits, labels)
    _common.check_same_batch(indices, logits, "indices", "logits")


def tracker_update(
    state: TrackerState,
    indices: jax.Array,
    losses: jax.Array,
    logits: jax.Array | None = None,
    labels: jax.Array | None = None,
) -> TrackerState:
  """Record one batch of observations of pool samples `indices`.

  Duplicate indices within a batch (sampling with replacement) are handled exactly: they count as
  consecutive observations of that sample in batch order. The batch is sorted by index (stable) and
  reduced with segment sums, so the cost is O(B log B) plus O(B) scatters, with no per-sample loop.

  Pass `logits` and `labels` for classification to track forgetting events (Toneva et al., 2019),
  prediction stability, dataset-cartography confidence (Swayamdipta et al., 2020) and EL2N; leave both
  out for regression, which tracks losses only. Jit it with the state donated:
  `jax.jit(tracker_update, donate_argnums=0)`.

  Args:
    state: current TrackerState over N samples.
    indices: (B,) integer indices into the pool, in [0, N); batch axis 0.
    losses: (B,) per-sample losses of this batch.
    logits: optional (B, C) logits of this batch.
    labels: optional (B,) integer labels in [0, C), given together with `logits`.

  Returns:
    The updated TrackerState.
  """
  num_samples = state.count.shape[0]
  _check_update(num_samples, indices, losses, logits, labels)
  groups = _group_batch(indices, num_samples)
  new = _record_losses(state, groups, losses)
  return new if logits is None else _record_classification(new, groups, logits, labels)


def tracker_summary(state: TrackerState) -> dict[str, jax.Array]:
  """Per-sample training-dynamics statistics from a TrackerState, each (N,).

  With n observations l_0, ..., l_{n-1} of a sample (and n' classified ones):

  * "count": n (int32); "cls_count": n' (int32).
  * "loss_mean": mean l_t (0 when n = 0).
  * "loss_std": population standard deviation sqrt(mean (l_t - mean l)^2) (0 when n < 2).
  * "loss_slope": least-squares slope of l_t against t = 0, 1, ..., n - 1, i.e.
    sum (t - t_bar)(l_t - l_bar) / (n (n^2 - 1) / 12) (0 when n < 2); negative while being learned.
  * "forgetting": number of correct -> incorrect transitions between consecutive classified
    observations (int32). Samples never classified correctly have 0 here; find them with
    "correctness" == 0 (Toneva et al. count those as unforgettable-never-learned separately).
  * "stability": fraction of the n' - 1 consecutive pairs whose argmax prediction did not change
    (1 when n' < 2: no change was observed).
  * "correctness": fraction of classified observations that were correct (0 when n' = 0).
  * "confidence", "variability": mean and population std of the true-class probability
    (dataset cartography; 0 when n' = 0).
  * "el2n": mean EL2N over the classified observations (0 when n' = 0).

  Args:
    state: a TrackerState over N samples.

  Returns:
    dict of (N,) arrays.
  """
  n = state.count.astype(jnp.float32)
  nc = state.cls_count.astype(jnp.float32)
  safe_n, safe_nc = jnp.maximum(n, 1.0), jnp.maximum(nc, 1.0)
  stt = n * (jnp.square(n) - 1.0) / 12.0
  return {
      "count": state.count,
      "loss_mean": state.loss_mean,
      "loss_std": jnp.sqrt(jnp.maximum(state.loss_m2, 0.0) / safe_n),
      "loss_slope": numerics.safe_divide(state.loss_cm, stt),  # stt > 0 exactly when n > 1
      "cls_count": state.cls_count,
      "forgetting": state.forgetting,
      "stability": numerics.safe_divide(state.unchanged, nc - 1.0, 1.0),
      "correctness": state.correct_count / safe_nc,
      "confidence": state.conf_mean,
      "variability": jnp.sqrt(jnp.maximum(state.conf_m2, 0.0) / safe_nc),
      "el2n": state.el2n_mean,
  }


_DYNAMICS_KEYS = (
    "loss_mean",
    "loss_std",
    "loss_slope",
    "forgetting",
    "el2n",
    "stability",
    "confidence",
    "variability",
)


def training_dynamics_features(summary: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The MTS training-dynamics features, as float32 (N,) arrays, from a `tracker_summary`.

  Loss mean, std and slope are always present; forgetting count, mean EL2N, prediction stability and
  cartography confidence/variability are included when the summary has them. A summary from a tracker
  that never saw logits holds zeros (and stability 1) for those; drop them for regression.

  Args:
    summary: dict of (N,) arrays as returned by `tracker_summary`.

  Returns:
    dict of (N,) float32 arrays keyed by a subset of "loss_mean", "loss_std", "loss_slope",
    "forgetting", "el2n", "stability", "confidence", "variability".
  """
  missing = [k for k in _DYNAMICS_KEYS[:3] if k not in summary]
  if missing:
    raise ValueError(f"summary lacks {missing}; pass the dict returned by tracker_summary")
  return {k: jnp.asarray(summary[k], jnp.float32) for k in _DYNAMICS_KEYS if k in summary}
