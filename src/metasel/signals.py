"""Per-sample data-quality signals and the MTS position and training-dynamics features.

Every function is pure, works on `jax.Array` inputs whose batch axis is 0, and can be called inside
`jax.jit` and `jax.vmap` (integer arguments such as `k`, `num_classes` and `block_size` are static).
Nothing here is jitted: jit the step that calls it.

Four groups:

* Output signals of one forward pass: `predictive_entropy`, `margin`, `el2n`, `true_class_prob`,
  `embedding_norm`. (Per-sample losses and gradient norms live in `metasel.persample`.)
* Redundancy in embedding space: `redundancy`, computed in row blocks with
  `jax.lax.map(..., batch_size=block_size)` so that at most a (block_size, N) slice of the cosine
  matrix exists at a time.
* MTS position features (Du, Zhao, Li, "On the Difficulty of Learning a Meta-network for Training Data
  Selection"), locating each sample relative to a clean reference set such as the validation set:
  `cosine_to_class_centre`, `cosine_to_reference_centre`, `topk_cosine_to_reference`,
  `knn_label_agreement`, `loss_percentile_within_class`, and `position_features` for all of them.
* A training-dynamics tracker in the optax manner: `TrackerState`, `tracker_init`, `tracker_update`,
  `tracker_summary`, and `training_dynamics_features`. It keeps O(N) running moments, not histories.

Cosines treat a zero vector as orthogonal to everything (cosine 0). Cosine matrix products use
`precision="highest"` so that duplicates reach cosine 1 on accelerators as well.

Argument checks that depend on values (labels in range, classes present in the reference) run only
when the values are concrete, i.e. outside `jit`/`vmap`; shape checks always run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "predictive_entropy",
    "margin",
    "el2n",
    "true_class_prob",
    "embedding_norm",
    "redundancy",
    "cosine_to_class_centre",
    "cosine_to_reference_centre",
    "topk_cosine_to_reference",
    "knn_label_agreement",
    "loss_percentile_within_class",
    "position_features",
    "TrackerState",
    "tracker_init",
    "tracker_update",
    "tracker_summary",
    "training_dynamics_features",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# Argument checks.


def _concrete(x) -> np.ndarray | None:
  """`x` as a numpy array when its value is known (not a tracer), else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_rank(x, rank: int, name: str, shape: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have shape {shape}, got shape {jnp.shape(x)}")


def _check_same_batch(a, b, name_a: str, name_b: str) -> None:
  if jnp.shape(a)[0] != jnp.shape(b)[0]:
    raise ValueError(
        f"{name_a} and {name_b} disagree on the batch axis 0: {jnp.shape(a)[0]} vs {jnp.shape(b)[0]}"
    )


def _check_int_range(x, upper: int, name: str, what: str) -> None:
  """Raise when concrete integers `x` fall outside [0, upper)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(x)}")
  values = _concrete(x)
  if values is None or values.size == 0:
    return
  bad = values[(values < 0) | (values >= upper)]
  if bad.size:
    raise ValueError(f"{name} must be {what} in [0, {upper}), got {bad[0]} (and {bad.size - 1} more)")


def _check_logits_labels(logits, labels) -> None:
  _check_rank(logits, 2, "logits", "(batch, classes)")
  _check_rank(labels, 1, "labels", "(batch,)")
  _check_same_batch(logits, labels, "logits", "labels")
  _check_int_range(labels, jnp.shape(logits)[1], "labels", "class indices")


def _check_embeddings(emb, name: str = "embeddings") -> None:
  _check_rank(emb, 2, name, "(batch, dim)")


def _check_labelled_reference(embeddings, labels, ref_embeddings, ref_labels) -> None:
  """Shapes of labelled samples (N, D), (N,) against a labelled reference set (M, D), (M,)."""
  _check_embeddings(embeddings)
  _check_embeddings(ref_embeddings, "ref_embeddings")
  _check_rank(labels, 1, "labels", "(batch,)")
  _check_rank(ref_labels, 1, "ref_labels", "(batch,)")
  _check_same_batch(embeddings, labels, "embeddings", "labels")
  _check_same_batch(ref_embeddings, ref_labels, "ref_embeddings", "ref_labels")


def _check_k(k: int, available: int, what: str) -> None:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= available:
    raise ValueError(f"k must be an integer in [1, {available}] ({what}), got {k!r}")


def _check_block_size(block_size: int) -> None:
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


# ----------------------------------------------------------------------------------------------------
# Output signals.


def _float(x: jax.Array) -> jax.Array:
  """`x` in at least float32."""
  return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def predictive_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the predictive distribution, H_i = -sum_c p_ic log p_ic with p_i = softmax(logits_i).

  In [0, log C]; classes with probability 0 contribute 0.

  Args:
    logits: (B, C) unnormalised log-probabilities, batch axis 0.

  Returns:
    (B,) entropies in nats.
  """
  _check_rank(logits, 2, "logits", "(batch, classes)")
  logp = jax.nn.log_softmax(_float(logits), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def true_class_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Probability the model gives the labelled class, p_{i, y_i}.

  Args:
    logits: (B, C) logits, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) probabilities in [0, 1].
  """
  _check_logits_labels(logits, labels)
  p = jax.nn.softmax(_float(logits), axis=-1)
  return jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Probability margin: true-class probability minus the largest other class probability.

      m_i = p_{i, y_i} - max_{c != y_i} p_ic,     p_i = softmax(logits_i).

  Measured on probabilities rather than logits (the area-under-the-margin convention), so the value
  lies in [-1, 1] and is comparable across models and training stages; m_i > 0 exactly when the
  sample is classified correctly (up to ties).

  Args:
    logits: (B, C) logits with C >= 2, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) margins in [-1, 1].
  """
  _check_logits_labels(logits, labels)
  num_classes = jnp.shape(logits)[1]
  if num_classes < 2:
    raise ValueError(f"margin needs at least 2 classes, got logits of shape {jnp.shape(logits)}")
  p = jax.nn.softmax(_float(logits), axis=-1)
  is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
  p_true = jnp.sum(jnp.where(is_true, p, 0.0), axis=-1)
  p_other = jnp.max(jnp.where(is_true, -jnp.inf, p), axis=-1)
  return p_true - p_other


def el2n(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Error L2 norm (Paul et al., 2021): ||softmax(logits_i) - onehot(y_i)||_2.

  Args:
    logits: (B, C) logits, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) norms in [0, sqrt(2)].
  """
  _check_logits_labels(logits, labels)
  p = jax.nn.softmax(_float(logits), axis=-1)
  err = p - jax.nn.one_hot(labels, jnp.shape(logits)[1], dtype=p.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(err), axis=-1))


def embedding_norm(embeddings: jax.Array) -> jax.Array:
  """Euclidean norm of each embedding, ||e_i||_2.

  Args:
    embeddings: (B, D) embeddings, batch axis 0.

  Returns:
    (B,) norms.
  """
  _check_embeddings(embeddings)
  return jnp.linalg.norm(_float(embeddings), axis=-1)


# ----------------------------------------------------------------------------------------------------
# Cosine neighbourhoods, computed blockwise.


def _unit(x: jax.Array) -> jax.Array:
  """Rows of `x` scaled to unit norm; zero rows stay zero (cosine 0 with everything)."""
  x = _float(x)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def _topk_cosine(
    query: jax.Array, ref: jax.Array, k: int, block_size: int, exclude_self: bool
) -> tuple[jax.Array, jax.Array]:
  """Top-k cosines (N, k) of each query row against `ref` and their reference indices (N, k).

  Query rows are processed `block_size` at a time, so at most a (block_size, M) slice of the cosine
  matrix exists. With `exclude_self`, query i skips reference row i (same index, not same value), so
  duplicates of a sample at other indices still count with cosine 1. Ties keep the lower index first.
  """
  q, r = _unit(query), _unit(ref)
  ref_index = jnp.arange(r.shape[0])

  def one(args):
    x, i = args
    s = jnp.clip(jnp.dot(r, x, precision=_HIGHEST), -1.0, 1.0)
    if exclude_self:
      s = jnp.where(ref_index == i, -jnp.inf, s)
    return jax.lax.top_k(s, k)

  return jax.lax.map(one, (q, jnp.arange(q.shape[0])), batch_size=block_size)


def redundancy(
    embeddings: jax.Array, *, k: int = 5, block_size: int = 256
) -> tuple[jax.Array, jax.Array]:
  """Redundancy of each sample within its own set: its highest and its mean top-k cosine to others.

      max_cosine_i       = max_{j != i} cos(e_i, e_j)
      mean_topk_cosine_i = mean of the k largest cos(e_i, e_j), j != i

  Only the sample's own index is excluded, so an exact duplicate at another index counts with
  cosine 1. The (N, N) cosine matrix is never formed: rows are handled `block_size` at a time
  (`jax.lax.map(..., batch_size=block_size)`), holding a (block_size, N) slice.

  Args:
    embeddings: (N, D) embeddings, batch axis 0, N >= 2.
    k: number of nearest neighbours averaged, 1 <= k <= N - 1.
    block_size: rows per block; any positive value (it need not divide N).

  Returns:
    (max_cosine, mean_topk_cosine), each (N,) in [-1, 1].
  """
  _check_embeddings(embeddings)
  _check_k(k, jnp.shape(embeddings)[0] - 1, "other samples in the set")
  _check_block_size(block_size)
  top, _ = _topk_cosine(embeddings, embeddings, k, block_size, exclude_self=True)
  return top[:, 0], jnp.mean(top, axis=-1)


# ----------------------------------------------------------------------------------------------------
# MTS position features.


def _class_counts_check(labels, ref_labels, num_classes: int) -> None:
  """Raise when a class used by `labels` has no reference sample (only with concrete values)."""
  used, ref = _concrete(labels), _concrete(ref_labels)
  if used is None or ref is None:
    return
  missing = np.setdiff1d(np.unique(used), np.unique(ref))
  if missing.size:
    raise ValueError(
        f"classes {missing.tolist()} occur in labels but have no sample in ref_labels; every class"
        " of the scored samples needs at least one reference sample to define its centre"
    )


def cosine_to_class_centre(
    embeddings: jax.Array,
    labels: jax.Array,
    ref_embeddings: jax.Array,
    ref_labels: jax.Array,
    num_classes: int,
) -> jax.Array:
  """Cosine of each sample to the mean reference embedding of its own class.

      mu_c = mean_{j: r_j = c} f_j,      out_i = cos(e_i, mu_{y_i}).

  The centre is the mean of the raw (not normalised) reference embeddings. A class without any
  reference sample has no centre: outside `jit` this raises a ValueError; under `jit`/`vmap` the
  centre is the zero vector and the cosine is 0.

  Args:
    embeddings: (N, D) embeddings of the scored samples, batch axis 0.
    labels: (N,) integer labels in [0, num_classes).
    ref_embeddings: (M, D) embeddings of the reference set (e.g. the validation set).
    ref_labels: (M,) integer labels of the reference set.
    num_classes: number of classes C (static).

  Returns:
    (N,) cosines in [-1, 1].
  """
  _check_labelled_reference(embeddings, labels, ref_embeddings, ref_labels)
  _check_int_range(labels, num_classes, "labels", "class indices")
  _check_int_range(ref_labels, num_classes, "ref_labels", "class indices")
  _class_counts_check(labels, ref_labels, num_classes)
  ref = _float(ref_embeddings)
  sums = jax.ops.segment_sum(ref, ref_labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(jnp.ones(ref.shape[0], ref.dtype), ref_labels, num_segments=num_classes)
  centres = _unit(sums / jnp.maximum(counts, 1.0)[:, None])
  return jnp.clip(jnp.sum(_unit(embeddings) * centres[labels], axis=-1), -1.0, 1.0)


def cosine_to_reference_centre(embeddings: jax.Array, ref_embeddings: jax.Array) -> jax.Array:
  """Cosine of each sample to the mean of all reference embeddings, cos(e_i, mean_j f_j).

  Args:
    embeddings: (N, D) embeddings, batch axis 0.
    ref_embeddings: (M, D) reference embeddings.

  Returns:
    (N,) cosines in [-1, 1].
  """
  _check_embeddings(embeddings)
  _check_embeddings(ref_embeddings, "ref_embeddings")
  centre = _unit(jnp.mean(_float(ref_embeddings), axis=0, keepdims=True))[0]
  return jnp.clip(jnp.dot(_unit(embeddings), centre, precision=_HIGHEST), -1.0, 1.0)


def topk_cosine_to_reference(
    embeddings: jax.Array, ref_embeddings: jax.Array, k: int = 3, *, block_size: int = 256
) -> jax.Array:
  """Mean cosine of each sample to its k nearest reference samples (MTS uses k = 3).

  Nothing is excluded: pass a reference set disjoint from the scored samples.

  Args:
    embeddings: (N, D) embeddings, batch axis 0.
    ref_embeddings: (M, D) reference embeddings.
    k: neighbours averaged, 1 <= k <= M.
    block_size: scored samples per block; at most (block_size, M) cosines exist at once.

  Returns:
    (N,) mean top-k cosines in [-1, 1].
  """
  _check_embeddings(embeddings)
  _check_embeddings(ref_embeddings, "ref_embeddings")
  _check_k(k, jnp.shape(ref_embeddings)[0], "reference samples")
  _check_block_size(block_size)
  top, _ = _topk_cosine(embeddings, ref_embeddings, k, block_size, exclude_self=False)
  return jnp.mean(top, axis=-1)


def knn_label_agreement(
    embeddings: jax.Array,
    labels: jax.Array,
    ref_embeddings: jax.Array,
    ref_labels: jax.Array,
    k: int = 5,
    *,
    weighted: bool = False,
    block_size: int = 256,
) -> jax.Array:
  """Share of the k nearest reference samples (by cosine) that carry the sample's label.

  Unweighted: a_i = (1/k) sum_{j in kNN(i)} [r_j = y_i].
  Weighted (`weighted=True`, as in MTS): each neighbour counts with w_ij = max(cos(e_i, f_j), 0),
  a_i = sum_j w_ij [r_j = y_i] / sum_j w_ij; when all k weights are 0 the unweighted share is used.
  Equal cosines keep the lower reference index first.

  Args:
    embeddings: (N, D) embeddings, batch axis 0.
    labels: (N,) integer labels.
    ref_embeddings: (M, D) reference embeddings.
    ref_labels: (M,) integer reference labels.
    k: neighbours, 1 <= k <= M.
    weighted: weight neighbours by their clipped cosine.
    block_size: scored samples per block; at most (block_size, M) cosines exist at once.

  Returns:
    (N,) agreements in [0, 1].
  """
  _check_labelled_reference(embeddings, labels, ref_embeddings, ref_labels)
  _check_k(k, jnp.shape(ref_embeddings)[0], "reference samples")
  _check_block_size(block_size)
  sims, idx = _topk_cosine(embeddings, ref_embeddings, k, block_size, exclude_self=False)
  return _agreement(sims, idx, labels, ref_labels, weighted)


def _agreement(sims, idx, labels, ref_labels, weighted: bool) -> jax.Array:
  """kNN label agreement (N,) from neighbour cosines and indices (N, k)."""
  agree = (ref_labels[idx] == labels[:, None]).astype(sims.dtype)
  plain = jnp.mean(agree, axis=-1)
  if not weighted:
    return plain
  w = jnp.maximum(sims, 0.0)
  total = jnp.sum(w, axis=-1)
  return jnp.where(total > 0, jnp.sum(w * agree, axis=-1) / jnp.where(total > 0, total, 1.0), plain)


def loss_percentile_within_class(losses: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Percentile rank of each sample's loss among the samples of its own class, in [0, 1].

  With n_c samples in class c and average ranks (ties share the mean of their ranks, 1-based),

      q_i = (rank_i - 1) / (n_c - 1) = (#{j in c: l_j < l_i} + (#{j in c: l_j = l_i} - 1) / 2) / (n_c - 1),

  so the lowest loss of a class gets 0, the highest 1, and a class whose losses are all equal (or a
  class with a single sample) gets 0.5. Sorting makes it O(N log N); no (N, N) comparison is formed.
  Losses should be finite.

  Args:
    losses: (N,) per-sample losses, batch axis 0.
    labels: (N,) integer labels in [0, num_classes).
    num_classes: number of classes C (static).

  Returns:
    (N,) percentile ranks in [0, 1].
  """
  _check_rank(losses, 1, "losses", "(batch,)")
  _check_rank(labels, 1, "labels", "(batch,)")
  _check_same_batch(losses, labels, "losses", "labels")
  _check_int_range(labels, num_classes, "labels", "class indices")
  losses = _float(losses)
  n = losses.shape[0]
  order = jnp.lexsort((losses, labels))
  sorted_labels, sorted_losses = labels[order], losses[order]
  pos = jnp.arange(n)
  new_group = jnp.concatenate(
      [
          jnp.ones((min(n, 1),), bool),
          (sorted_labels[1:] != sorted_labels[:-1]) | (sorted_losses[1:] != sorted_losses[:-1]),
      ]
  )
  group_start = jax.lax.cummax(jnp.where(new_group, pos, 0))
  group_id = jnp.cumsum(new_group) - 1
  group_size = jax.ops.segment_sum(jnp.ones(n, jnp.int32), group_id, num_segments=n)[group_id]
  class_count = jax.ops.segment_sum(jnp.ones(n, jnp.int32), labels, num_segments=num_classes)
  class_start = jnp.cumsum(class_count) - class_count
  below = (group_start - class_start[sorted_labels]).astype(losses.dtype)
  n_c = class_count[sorted_labels].astype(losses.dtype)
  rank = below + (group_size.astype(losses.dtype) - 1.0) / 2.0
  q = jnp.where(n_c > 1, rank / jnp.maximum(n_c - 1.0, 1.0), 0.5)
  return jnp.zeros_like(q).at[order].set(q, unique_indices=True)


def position_features(
    embeddings: jax.Array,
    labels: jax.Array,
    ref_embeddings: jax.Array,
    ref_labels: jax.Array,
    num_classes: int,
    *,
    losses: jax.Array | None = None,
    topk: int = 3,
    knn: int = 5,
    weighted_knn: bool = True,
    block_size: int = 256,
) -> dict[str, jax.Array]:
  """The MTS position features of each sample relative to a reference set, as a dict of (N,) arrays.

  Keys: "cos_class_centre" (`cosine_to_class_centre`), "cos_ref_centre"
  (`cosine_to_reference_centre`), "topk_cos_ref" (`topk_cosine_to_reference`, k=`topk`),
  "knn_agreement" (`knn_label_agreement`, k=`knn`, similarity-weighted by default as in MTS), and
  "loss_percentile" (`loss_percentile_within_class` over the scored set) when `losses` is given.

  Args:
    embeddings: (N, D) embeddings of the scored samples, batch axis 0.
    labels: (N,) integer labels in [0, num_classes).
    ref_embeddings: (M, D) embeddings of the clean reference set (e.g. the validation set).
    ref_labels: (M,) integer labels of the reference set.
    num_classes: number of classes C (static).
    losses: optional (N,) per-sample losses of the scored samples.
    topk: neighbours for "topk_cos_ref".
    knn: neighbours for "knn_agreement".
    weighted_knn: weight the kNN vote by clipped cosine.
    block_size: scored samples per block for the neighbour searches.

  Returns:
    dict of (N,) float arrays.
  """
  # cosine_to_class_centre validates shapes, labels and classes for the whole set of features.
  centre = cosine_to_class_centre(embeddings, labels, ref_embeddings, ref_labels, num_classes)
  m = jnp.shape(ref_embeddings)[0]
  _check_k(topk, m, "reference samples, for topk")
  _check_k(knn, m, "reference samples, for knn")
  _check_block_size(block_size)
  # One neighbour search serves both: top_k returns cosines in descending order.
  sims, idx = _topk_cosine(embeddings, ref_embeddings, max(topk, knn), block_size, exclude_self=False)
  feats = {
      "cos_class_centre": centre,
      "cos_ref_centre": cosine_to_reference_centre(embeddings, ref_embeddings),
      "topk_cos_ref": jnp.mean(sims[:, :topk], axis=-1),
      "knn_agreement": _agreement(sims[:, :knn], idx[:, :knn], labels, ref_labels, weighted_knn),
  }
  if losses is not None:
    feats["loss_percentile"] = loss_percentile_within_class(losses, labels, num_classes)
  return feats


# ----------------------------------------------------------------------------------------------------
# Training-dynamics tracker.


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
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
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
  _check_rank(indices, 1, "indices", "(batch,)")
  _check_rank(losses, 1, "losses", "(batch,)")
  _check_same_batch(indices, losses, "indices", "losses")
  _check_int_range(indices, num_samples, "indices", "pool indices")
  if (logits is None) != (labels is None):
    raise ValueError("logits and labels must be given together (both or neither)")
  if logits is not None:
    _check_logits_labels(logits, labels)
    _check_same_batch(indices, logits, "indices", "logits")

  b = indices.shape[0]
  order = jnp.argsort(indices, stable=True)
  idx = indices[order]
  pos = jnp.arange(b)
  is_first = jnp.concatenate([jnp.ones((min(b, 1),), bool), idx[1:] != idx[:-1]])
  is_last = jnp.concatenate([idx[1:] != idx[:-1], jnp.ones((min(b, 1),), bool)])
  group = jnp.cumsum(is_first) - 1
  rank = (pos - jax.lax.cummax(jnp.where(is_first, pos, 0))).astype(jnp.float32)

  def gsum(x):
    """Per-element sum of `x` over the element's group of equal indices."""
    return jax.ops.segment_sum(x, group, num_segments=b, indices_are_sorted=True)[group]

  n_b = gsum(jnp.ones((b,), jnp.float32))

  def batch_moments(x):
    """Group mean, group M2 and each element's deviation from its group mean, per element."""
    mean = gsum(x) / n_b
    return mean, gsum(jnp.square(x - mean)), x - mean

  # Only the last element of each group writes; the others are sent out of range and dropped.
  dst = jnp.where(is_last, idx, num_samples)

  def write(field, value):
    return field.at[dst].set(value.astype(field.dtype), mode="drop")

  loss = _float(losses)[order].astype(jnp.float32)
  n_a = state.count[idx].astype(jnp.float32)
  mean_b, m2_b, dev = batch_moments(loss)
  cm_b = gsum((rank - (n_b - 1.0) / 2.0) * dev)
  # For t = 0..n-1 split into the first n_a and the last n_b, mean t differs by (n_a + n_b) / 2.
  delta, mean, m2 = _merge(n_a, state.loss_mean[idx], state.loss_m2[idx], n_b, mean_b, m2_b)
  cm = state.loss_cm[idx] + cm_b + delta * n_a * n_b / 2.0
  new = state._replace(
      count=write(state.count, n_a + n_b),
      loss_mean=write(state.loss_mean, mean),
      loss_m2=write(state.loss_m2, m2),
      loss_cm=write(state.loss_cm, cm),
  )
  if logits is None:
    return new

  logits = _float(logits)[order]
  labels = labels[order]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  correct = pred == labels
  conf = true_class_prob(logits, labels).astype(jnp.float32)
  err = el2n(logits, labels).astype(jnp.float32)

  # The previous observation of each element: the one before it in its group, or the stored last one.
  first = rank == 0
  has_prev = jnp.where(first, state.cls_count[idx] > 0, True)
  prev_correct = jnp.where(first, state.last_correct[idx], jnp.roll(correct, 1))
  prev_pred = jnp.where(first, state.last_pred[idx], jnp.roll(pred, 1))
  forgot = has_prev & prev_correct & ~correct
  same = has_prev & (prev_pred == pred)

  c_a = state.cls_count[idx].astype(jnp.float32)
  conf_b, conf_m2_b, _ = batch_moments(conf)
  _, conf_mean, conf_m2 = _merge(c_a, state.conf_mean[idx], state.conf_m2[idx], n_b, conf_b, conf_m2_b)
  _, el2n_mean, _ = _merge(c_a, state.el2n_mean[idx], 0.0, n_b, gsum(err) / n_b, 0.0)
  return new._replace(
      cls_count=write(state.cls_count, c_a + n_b),
      correct_count=write(state.correct_count, state.correct_count[idx] + gsum(correct.astype(jnp.int32))),
      forgetting=write(state.forgetting, state.forgetting[idx] + gsum(forgot.astype(jnp.int32))),
      unchanged=write(state.unchanged, state.unchanged[idx] + gsum(same.astype(jnp.int32))),
      last_correct=write(state.last_correct, correct),
      last_pred=write(state.last_pred, pred),
      conf_mean=write(state.conf_mean, conf_mean),
      conf_m2=write(state.conf_m2, conf_m2),
      el2n_mean=write(state.el2n_mean, el2n_mean),
  )


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
      "loss_slope": jnp.where(n > 1, state.loss_cm / jnp.where(n > 1, stt, 1.0), 0.0),
      "cls_count": state.cls_count,
      "forgetting": state.forgetting,
      "stability": jnp.where(nc > 1, state.unchanged / jnp.maximum(nc - 1.0, 1.0), 1.0),
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
