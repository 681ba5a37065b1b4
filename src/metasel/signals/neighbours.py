"""Cosine neighbourhoods in embedding space: redundancy within a set, and the MTS position features
that place each sample relative to a clean reference set (class centres, nearest neighbours, loss rank).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metasel import checks, numerics
from metasel.signals import _common

__all__ = [
    "redundancy",
    "cosine_to_class_centre",
    "cosine_to_reference_centre",
    "topk_cosine_to_reference",
    "knn_label_agreement",
    "loss_percentile_within_class",
    "position_features",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_labelled_reference(embeddings, labels, ref_embeddings, ref_labels) -> None:
  """Shapes of labelled samples (N, D), (N,) against a labelled reference set (M, D), (M,)."""
  _common.check_embeddings(embeddings)
  _common.check_embeddings(ref_embeddings, "ref_embeddings")
  _common.check_rank(labels, 1, "labels", "(batch,)")
  _common.check_rank(ref_labels, 1, "ref_labels", "(batch,)")
  _common.check_same_batch(embeddings, labels, "embeddings", "labels")
  _common.check_same_batch(ref_embeddings, ref_labels, "ref_embeddings", "ref_labels")


def _check_k(k: int, available: int, what: str) -> None:
  """Raise unless 1 <= k <= available, saying what the k neighbours are drawn from."""
  if not checks.is_int(k) or not 1 <= k <= available:
    raise ValueError(f"k must be an integer in [1, {available}] ({what}), got {k!r}")


# ----------------------------------------------------------------------------------------------------
# Cosine neighbourhoods, computed blockwise.


def _unit(x: jax.Array) -> jax.Array:
  """Rows of `x` scaled to unit norm; zero rows stay zero (cosine 0 with everything)."""
  x = _common.as_float(x)
  # Not safe_divide: its extra select changes how XLA fuses the cosines, moving jitted values by an ulp.
  return x / numerics.nonzero_scale(jnp.linalg.norm(x, axis=-1, keepdims=True))


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
  _common.check_embeddings(embeddings)
  _check_k(k, jnp.shape(embeddings)[0] - 1, "other samples in the set")
  checks.check_int("block_size", block_size)
  top, _ = _topk_cosine(embeddings, embeddings, k, block_size, exclude_self=True)
  return top[:, 0], jnp.mean(top, axis=-1)


# ----------------------------------------------------------------------------------------------------
# MTS position features.


def _class_counts_check(labels, ref_labels, num_classes: int) -> None:
  """Raise when a class used by `labels` has no reference sample (only with concrete values)."""
  used, ref = _common.concrete(labels), _common.concrete(ref_labels)
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
  _common.check_index_range(labels, num_classes, "labels", "class indices")
  _common.check_index_range(ref_labels, num_classes, "ref_labels", "class indices")
  _class_counts_check(labels, ref_labels, num_classes)
  ref = _common.as_float(ref_embeddings)
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
  _common.check_embeddings(embeddings)
  _common.check_embeddings(ref_embeddings, "ref_embeddings")
  centre = _unit(jnp.mean(_common.as_float(ref_embeddings), axis=0, keepdims=True))[0]
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
  _common.check_embeddings(embeddings)
  _common.check_embeddings(ref_embeddings, "ref_embeddings")
  _check_k(k, jnp.shape(ref_embeddings)[0], "reference samples")
  checks.check_int("block_size", block_size)
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
  checks.check_int("block_size", block_size)
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
  return numerics.safe_divide(jnp.sum(w * agree, axis=-1), total, plain)


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
  _common.check_rank(losses, 1, "losses", "(batch,)")
  _common.check_rank(labels, 1, "labels", "(batch,)")
  _common.check_same_batch(losses, labels, "losses", "labels")
  _common.check_index_range(labels, num_classes, "labels", "class indices")
  losses = _common.as_float(losses)
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
  q = numerics.safe_divide(rank, n_c - 1.0, 0.5)
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
  checks.check_int("block_size", block_size)
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
