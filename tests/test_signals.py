"""Per-sample signals, redundancy, MTS position features and the tracker against naive Python loops."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metasel import signals

RTOL, ATOL = 1e-5, 1e-6
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _call(fn, jit, *args, **static):
  """`fn(*args, **static)`, through `jax.jit` (with `static` closed over) when `jit`."""
  f = functools.partial(fn, **static)
  return (jax.jit(f) if jit else f)(*args)


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL)


def test_package_exports_every_public_name_from_its_concern():
  names = {
      "outputs": ["predictive_entropy", "margin", "el2n", "true_class_prob", "embedding_norm"],
      "neighbours": [
          "redundancy", "cosine_to_class_centre", "cosine_to_reference_centre", "topk_cosine_to_reference",
          "knn_label_agreement", "loss_percentile_within_class", "position_features"],
      "dynamics": [
          "TrackerState", "tracker_init", "tracker_update", "tracker_summary", "training_dynamics_features"],
      "summaries": ["pool_summary"],
  }
  assert signals.__all__ == [name for group in names.values() for name in group]
  for module, group in names.items():
    for name in group:
      assert getattr(signals, name).__module__ == f"metasel.signals.{module}", name


# ----------------------------------------------------------------------------------------------------
# Naive references: one sample at a time, float64 numpy.


def _softmax(row):
  z = np.exp(row - row.max())
  return z / z.sum()


def _cos(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _naive_output_signals(logits, labels):
  out = {k: [] for k in ("entropy", "margin", "el2n", "tcp")}
  for row, y in zip(np.asarray(logits, np.float64), np.asarray(labels)):
    p = _softmax(row)
    out["entropy"].append(-sum(pc * np.log(pc) for pc in p if pc > 0))
    out["margin"].append(p[y] - max(pc for c, pc in enumerate(p) if c != y))
    onehot = np.zeros_like(p)
    onehot[y] = 1.0
    out["el2n"].append(np.sqrt(np.sum((p - onehot) ** 2)))
    out["tcp"].append(p[y])
  return {k: np.array(v) for k, v in out.items()}


def _naive_topk_to(query, ref, k, exclude_self=False):
  """Top-k cosines and reference indices (lower index first among ties) of each query row."""
  vals, idxs = [], []
  for i, q in enumerate(np.asarray(query, np.float64)):
    rows = enumerate(np.asarray(ref, np.float64))
    sims = [(_cos(q, r), j) for j, r in rows if not (exclude_self and j == i)]
    sims.sort(key=lambda t: (-t[0], t[1]))
    vals.append([s for s, _ in sims[:k]])
    idxs.append([j for _, j in sims[:k]])
  return np.array(vals), np.array(idxs)


def _naive_percentile(losses, labels):
  out = []
  for i in range(len(losses)):
    same = [losses[j] for j in range(len(losses)) if labels[j] == labels[i]]
    if len(same) == 1:
      out.append(0.5)
      continue
    less = sum(v < losses[i] for v in same)
    equal = sum(v == losses[i] for v in same)
    out.append((less + (equal - 1) / 2) / (len(same) - 1))
  return np.array(out)


# ----------------------------------------------------------------------------------------------------
# Output signals.


def _logits_labels(b=16, c=5, seed=0):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.normal(size=(b, c))).astype(np.float32)
  logits[0] = [60.0, -60.0, 0.0, 1.0, -3.0][:c]  # near one-hot: probabilities underflow to 0
  logits[1] = 0.0  # uniform: entropy log C, margin 0
  labels = rng.integers(0, c, size=b).astype(np.int32)
  return jnp.asarray(logits), jnp.asarray(labels)


@JIT
def test_output_signals_match_naive_loop(jit):
  logits, labels = _logits_labels()
  ref = _naive_output_signals(logits, labels)
  _close(_call(signals.predictive_entropy, jit, logits), ref["entropy"])
  _close(_call(signals.margin, jit, logits, labels), ref["margin"])
  _close(_call(signals.el2n, jit, logits, labels), ref["el2n"])
  _close(_call(signals.true_class_prob, jit, logits, labels), ref["tcp"])
  emb = jax.random.normal(jax.random.key(1), (16, 7))
  _close(_call(signals.embedding_norm, jit, emb), [np.linalg.norm(np.asarray(e, np.float64)) for e in emb])
  np.testing.assert_allclose(signals.predictive_entropy(logits)[1], np.log(5), rtol=RTOL)


def test_output_signals_vmap_over_extra_axis():
  logits = jax.random.normal(jax.random.key(2), (3, 8, 4))
  labels = jax.random.randint(jax.random.key(3), (3, 8), 0, 4)
  for fn in (signals.margin, signals.el2n, signals.true_class_prob):
    stacked = jax.vmap(fn)(logits, labels)
    one = jax.jit(fn)
    _close(stacked, np.stack([one(logits[i], labels[i]) for i in range(3)]))


def test_output_signals_reject_bad_input():
  logits, labels = _logits_labels()
  with pytest.raises(ValueError, match="labels must be class indices in \\[0, 5\\)"):
    signals.margin(logits, labels.at[2].set(5))
  with pytest.raises(ValueError, match="disagree on the batch axis"):
    signals.el2n(logits, labels[:-1])
  with pytest.raises(ValueError, match="at least 2 classes"):
    signals.margin(logits[:, :1], jnp.zeros(16, jnp.int32))
  with pytest.raises(ValueError, match="shape \\(batch, classes\\)"):
    signals.predictive_entropy(logits[0])


@settings(max_examples=40, deadline=None)
@given(
    logits=hnp.arrays(np.float32, (8, 5), elements=st.floats(-40, 40, width=32)),
    labels=hnp.arrays(np.int32, (8,), elements=st.integers(0, 4)),
)
def test_output_signal_ranges(logits, labels):
  h = np.asarray(signals.predictive_entropy(logits))
  assert np.all(h >= -1e-6) and np.all(h <= np.log(5) + 1e-5)
  m = np.asarray(signals.margin(logits, labels))
  assert np.all(np.abs(m) <= 1 + 1e-6)
  e = np.asarray(signals.el2n(logits, labels))
  assert np.all(e >= 0) and np.all(e <= np.sqrt(2) + 1e-6)
  # A clearly positive margin means the labelled class is the argmax.
  assert np.all(np.argmax(logits, axis=1)[m > 1e-3] == labels[m > 1e-3])


# ----------------------------------------------------------------------------------------------------
# Redundancy.


def _redundancy_embeddings(n=37, d=8):
  emb = np.array(jax.random.normal(jax.random.key(4), (n, d)))
  emb[10] = emb[3]  # exact duplicate
  emb[20] = 2.5 * emb[3]  # same direction, other scale
  emb[30] = 0.0  # zero vector: cosine 0 with everything
  return jnp.asarray(emb)


@JIT
@pytest.mark.parametrize("block_size", [1, 5, 16, 37, 64])
def test_redundancy_blocks_match_full_matrix(jit, block_size):
  emb = _redundancy_embeddings()
  k = 4
  max_cos, mean_topk = _call(signals.redundancy, jit, emb, k=k, block_size=block_size)
  # Full-matrix reference: the whole (N, N) cosine matrix with the diagonal removed.
  e = np.asarray(emb, np.float64)
  norms = np.linalg.norm(e, axis=1, keepdims=True)
  u = e / np.where(norms > 0, norms, 1.0)
  sim = u @ u.T
  np.fill_diagonal(sim, -np.inf)
  top = -np.sort(-sim, axis=1)[:, :k]
  _close(max_cos, top[:, 0])
  _close(mean_topk, top.mean(axis=1))
  np.testing.assert_allclose(np.asarray(max_cos)[[3, 10, 20]], 1.0, atol=1e-6)


def test_redundancy_matches_naive_loop_and_never_forms_full_matrix():
  emb = _redundancy_embeddings()
  vals, _ = _naive_topk_to(emb, emb, 3, exclude_self=True)
  max_cos, mean_topk = signals.redundancy(emb, k=3, block_size=8)
  _close(max_cos, vals[:, 0])
  _close(mean_topk, vals.mean(axis=1))
  jaxpr = str(jax.make_jaxpr(functools.partial(signals.redundancy, k=3, block_size=8))(emb))
  assert "f32[37,37]" not in jaxpr and "f32[8,37]" in jaxpr


def test_redundancy_all_duplicates_and_vmap():
  emb = jnp.tile(jnp.array([[1.0, 2.0, -0.5]]), (6, 1))
  max_cos, mean_topk = signals.redundancy(emb, k=5, block_size=4)
  np.testing.assert_allclose(max_cos, 1.0, atol=1e-6)
  np.testing.assert_allclose(mean_topk, 1.0, atol=1e-6)
  sets = jax.random.normal(jax.random.key(5), (3, 10, 4))
  per_set = functools.partial(signals.redundancy, k=2, block_size=3)
  stacked = jax.jit(jax.vmap(per_set))(sets)
  for i in range(3):
    one = jax.jit(per_set)(sets[i])
    _close(stacked[0][i], one[0])
    _close(stacked[1][i], one[1])


def test_redundancy_rejects_bad_k():
  emb = jax.random.normal(jax.random.key(4), (5, 3))
  with pytest.raises(ValueError, match="k must be an integer in \\[1, 4\\]"):
    signals.redundancy(emb, k=5)
  with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
    signals.redundancy(emb, k=2, block_size=0)
  with pytest.raises(ValueError, match="block_size must be an integer >= 1, got True"):
    signals.topk_cosine_to_reference(emb, emb, 2, block_size=True)
  with pytest.raises(ValueError, match="k must be an integer in \\[1, 5\\] \\(reference samples, for knn\\)"):
    signals.position_features(emb, jnp.zeros(5, jnp.int32), emb, jnp.zeros(5, jnp.int32), 1, knn=6)


# ----------------------------------------------------------------------------------------------------
# MTS position features.


def _position_data(n=23, m=17, d=6, c=4):
  k = jax.random.split(jax.random.key(6), 4)
  emb = jax.random.normal(k[0], (n, d))
  ref = jax.random.normal(k[1], (m, d)) + 0.3
  labels = jax.random.randint(k[2], (n,), 0, c)
  ref_labels = jnp.concatenate([jnp.arange(c), jax.random.randint(k[3], (m - c,), 0, c)])
  return emb, labels, ref, ref_labels, c


def _naive_class_centre(emb, labels, ref, ref_labels):
  emb, ref = np.asarray(emb, np.float64), np.asarray(ref, np.float64)
  out = []
  for e, y in zip(emb, np.asarray(labels)):
    members = [r for r, ry in zip(ref, np.asarray(ref_labels)) if ry == y]
    out.append(_cos(e, np.mean(members, axis=0)) if members else 0.0)
  return np.array(out)


def _naive_knn(emb, labels, ref, ref_labels, k, weighted):
  sims, idx = _naive_topk_to(emb, ref, k)
  out = []
  for i, y in enumerate(np.asarray(labels)):
    agree = np.array([float(np.asarray(ref_labels)[j] == y) for j in idx[i]])
    w = np.maximum(sims[i], 0.0)
    out.append(np.sum(w * agree) / np.sum(w) if weighted and np.sum(w) > 0 else agree.mean())
  return np.array(out)


@JIT
def test_position_features_match_naive_loops(jit):
  emb, labels, ref, ref_labels, c = _position_data()
  _close(
      _call(signals.cosine_to_class_centre, jit, emb, labels, ref, ref_labels, num_classes=c),
      _naive_class_centre(emb, labels, ref, ref_labels),
  )
  centre = np.asarray(ref, np.float64).mean(axis=0)
  _close(
      _call(signals.cosine_to_reference_centre, jit, emb, ref),
      [_cos(e, centre) for e in np.asarray(emb, np.float64)],
  )
  _close(
      _call(signals.topk_cosine_to_reference, jit, emb, ref, k=3, block_size=5),
      _naive_topk_to(emb, ref, 3)[0].mean(axis=1),
  )
  for weighted in (False, True):
    _close(
        _call(
            signals.knn_label_agreement, jit, emb, labels, ref, ref_labels,
            k=5, weighted=weighted, block_size=7,
        ),
        _naive_knn(emb, labels, ref, ref_labels, 5, weighted),
    )


@JIT
def test_position_features_dict(jit):
  emb, labels, ref, ref_labels, c = _position_data()
  losses = jnp.round(jax.random.uniform(jax.random.key(7), (23,)) * 4.0)
  feats = _call(signals.position_features, jit, emb, labels, ref, ref_labels, num_classes=c, losses=losses)
  assert set(feats) == {
      "cos_class_centre", "cos_ref_centre", "topk_cos_ref", "knn_agreement", "loss_percentile"}
  for v in feats.values():
    assert v.shape == (23,) and v.dtype == jnp.float32
  _close(feats["knn_agreement"], _naive_knn(emb, labels, ref, ref_labels, 5, True))
  _close(feats["topk_cos_ref"], _naive_topk_to(emb, ref, 3)[0].mean(axis=1))
  _close(feats["loss_percentile"], _naive_percentile(np.asarray(losses), np.asarray(labels)))
  other = _call(signals.position_features, jit, emb, labels, ref, ref_labels, num_classes=c,
                topk=4, knn=2, weighted_knn=False, block_size=6)
  assert "loss_percentile" not in other
  _close(other["topk_cos_ref"], _naive_topk_to(emb, ref, 4)[0].mean(axis=1))
  _close(other["knn_agreement"], _naive_knn(emb, labels, ref, ref_labels, 2, False))


@JIT
def test_zero_rows_and_dissimilar_neighbours(jit):
  """A zero embedding has cosine 0 to everything; a weighted kNN vote without positive weights is plain."""
  ref = -jnp.abs(jax.random.normal(jax.random.key(8), (6, 3))) - 0.1  # every entry negative
  ref_labels = jnp.array([0, 1, 0, 1, 0, 1])
  emb = jnp.concatenate([jnp.zeros((2, 3)), -ref[:2]])  # zero rows, then rows opposite to the reference
  labels = jnp.array([0, 1, 0, 1])
  _close(_call(signals.cosine_to_reference_centre, jit, emb, ref)[:2], [0.0, 0.0])
  centre = _call(signals.cosine_to_class_centre, jit, emb, labels, ref, ref_labels, num_classes=2)
  _close(centre[:2], [0.0, 0.0])
  weighted = _call(signals.knn_label_agreement, jit, emb, labels, ref, ref_labels, k=3, weighted=True)
  plain = _call(signals.knn_label_agreement, jit, emb, labels, ref, ref_labels, k=3)
  np.testing.assert_array_equal(weighted, plain)
  _close(weighted, _naive_knn(emb, labels, ref, ref_labels, 3, False))
  max_cos, _ = _call(signals.redundancy, jit, jnp.zeros((3, 2)), k=2)
  np.testing.assert_array_equal(max_cos, 0.0)


def test_class_absent_from_reference():
  emb, labels, ref, ref_labels, c = _position_data()
  ref_labels = jnp.where(ref_labels == 2, 1, ref_labels)  # no reference sample of class 2
  with pytest.raises(ValueError, match="classes \\[2\\] occur in labels but have no sample"):
    signals.cosine_to_class_centre(emb, labels, ref, ref_labels, c)
  under_jit = jax.jit(signals.cosine_to_class_centre, static_argnums=4)(emb, labels, ref, ref_labels, c)
  np.testing.assert_array_equal(np.asarray(under_jit)[np.asarray(labels) == 2], 0.0)
  _close(under_jit, _naive_class_centre(emb, labels, ref, ref_labels))


@JIT
def test_loss_percentile_with_ties(jit):
  losses = jnp.array([2.0, 1.0, 2.0, 3.0, 5.0, 5.0, 7.0, 0.5])
  labels = jnp.array([0, 0, 0, 0, 1, 1, 2, 3])
  q = _call(signals.loss_percentile_within_class, jit, losses, labels, num_classes=5)
  # Class 0: ranks 2.5, 1, 2.5, 4 of 4; class 1: tied pair; classes 2, 3: single samples.
  np.testing.assert_allclose(q, [0.5, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5], atol=1e-7)
  rng = np.random.default_rng(8)
  losses = rng.integers(0, 4, size=40).astype(np.float32)  # many ties
  labels = rng.integers(0, 3, size=40).astype(np.int32)
  q = _call(signals.loss_percentile_within_class, jit, losses, labels, num_classes=3)
  _close(q, _naive_percentile(losses, labels))


@settings(max_examples=40, deadline=None)
@given(
    losses=hnp.arrays(np.float32, (12,), elements=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 10.0])),
    labels=hnp.arrays(np.int32, (12,), elements=st.integers(0, 2)),
)
def test_loss_percentile_properties(losses, labels):
  q = np.asarray(signals.loss_percentile_within_class(losses, labels, 3))
  assert np.all(q >= 0) and np.all(q <= 1)
  np.testing.assert_allclose(q, _naive_percentile(losses, labels), atol=1e-6)
  for c in np.unique(labels):  # average ranks average to the middle of each class
    np.testing.assert_allclose(q[labels == c].mean(), 0.5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Tracker.


def _naive_summary(history, num_samples):
  """Summary statistics from the full per-sample history of (loss, pred, correct, p_true, el2n)."""
  out = {k: np.zeros(num_samples) for k in (
      "count", "loss_mean", "loss_std", "loss_slope", "forgetting", "stability",
      "correctness", "confidence", "variability", "el2n")}
  out["stability"][:] = 1.0
  for i in range(num_samples):
    obs = history[i]
    out["count"][i] = len(obs)
    if not obs:
      continue
    losses = np.array([o[0] for o in obs], np.float64)
    out["loss_mean"][i] = losses.mean()
    out["loss_std"][i] = losses.std()
    if len(obs) > 1:
      out["loss_slope"][i] = np.polyfit(np.arange(len(obs)), losses, 1)[0]
    cls = [o for o in obs if o[1] is not None]
    if not cls:
      continue
    preds, correct = [o[1] for o in cls], [o[2] for o in cls]
    out["forgetting"][i] = sum(a and not b for a, b in zip(correct, correct[1:]))
    if len(cls) > 1:
      out["stability"][i] = np.mean([a == b for a, b in zip(preds, preds[1:])])
    out["correctness"][i] = np.mean(correct)
    out["confidence"][i] = np.mean([o[3] for o in cls])
    out["variability"][i] = np.std([o[3] for o in cls])
    out["el2n"][i] = np.mean([o[4] for o in cls])
  return out


def _record(history, indices, losses, logits=None, labels=None):
  """Append one batch to the Python history, observation by observation in batch order."""
  for j, i in enumerate(np.asarray(indices)):
    if logits is None:
      history[i].append((float(losses[j]), None, None, None, None))
      continue
    p = _softmax(np.asarray(logits[j], np.float64))
    y = int(labels[j])
    pred = int(np.argmax(logits[j]))
    onehot = np.eye(len(p))[y]
    history[i].append((float(losses[j]), pred, pred == y, p[y], np.sqrt(np.sum((p - onehot) ** 2))))


def _check_summary(summary, history, num_samples):
  ref = _naive_summary(history, num_samples)
  for key, expected in ref.items():
    actual = np.asarray(summary[key], np.float64)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=2e-6, err_msg=key)


# Hand-made run: pool of 4 samples, C = 3, three epochs of permutation batches of size 2.
# Predicted class per (sample, epoch); labels are [0, 1, 2, 0].
_HAND_PRED = np.array([
    [0, 1, 0],  # correct, wrong, correct: 1 forgetting event, prediction changed twice
    [2, 1, 1],  # wrong, correct, correct: 0 forgetting, 1 of 2 pairs unchanged
    [2, 2, 0],  # correct, correct, wrong: 1 forgetting, 1 of 2 unchanged
    [1, 1, 1],  # never correct: 0 forgetting, fully stable
])
_HAND_LABELS = np.array([0, 1, 2, 0])
_HAND_LOSS = np.array([[3.0, 2.0, 1.5], [1.0, 1.0, 1.0], [0.5, 1.5, 2.0], [2.0, 4.0, 3.0]], np.float32)
_HAND_ORDER = [np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2]), np.array([3, 2, 1, 0])]


def _hand_batches():
  for epoch, perm in enumerate(_HAND_ORDER):
    for batch in (perm[:2], perm[2:]):
      # Logits: 2.0 on the predicted class plus a per-sample offset, so p_true varies across epochs.
      logits = np.zeros((2, 3), np.float32)
      logits[np.arange(2), _HAND_PRED[batch, epoch]] = 2.0 + 0.5 * epoch
      logits[:, 0] += 0.1 * batch
      yield batch, _HAND_LOSS[batch, epoch], logits, _HAND_LABELS[batch]


@JIT
def test_tracker_hand_made_epochs(jit):
  update = jax.jit(signals.tracker_update, donate_argnums=0) if jit else signals.tracker_update
  state = signals.tracker_init(4)
  history = [[] for _ in range(4)]
  for batch, loss, logits, labels in _hand_batches():
    state = update(state, jnp.asarray(batch), jnp.asarray(loss), jnp.asarray(logits), jnp.asarray(labels))
    _record(history, batch, loss, logits, labels)
  summary = signals.tracker_summary(state)
  np.testing.assert_array_equal(summary["count"], [3, 3, 3, 3])
  np.testing.assert_array_equal(summary["forgetting"], [1, 0, 1, 0])
  np.testing.assert_allclose(summary["stability"], [0.0, 0.5, 0.5, 1.0])
  np.testing.assert_allclose(summary["correctness"], [2 / 3, 2 / 3, 2 / 3, 0.0], rtol=1e-6)
  # Slopes by hand: least squares over t = 0, 1, 2 is (l_2 - l_0) / 2.
  np.testing.assert_allclose(summary["loss_slope"], [-0.75, 0.0, 0.75, 0.5], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(summary["loss_mean"], [6.5 / 3, 1.0, 4.0 / 3, 3.0], rtol=1e-6)
  _check_summary(summary, history, 4)
  feats = signals.training_dynamics_features(summary)
  assert set(feats) == {"loss_mean", "loss_std", "loss_slope", "forgetting", "el2n", "stability",
                        "confidence", "variability"}
  assert all(v.dtype == jnp.float32 and v.shape == (4,) for v in feats.values())


def test_tracker_duplicates_within_batch_and_unseen_samples():
  rng = np.random.default_rng(9)
  num, b, c = 7, 6, 3
  state = signals.tracker_init(num)
  history = [[] for _ in range(num)]
  update = jax.jit(signals.tracker_update)
  for step in range(8):
    idx = rng.choice(num - 1, size=b, replace=True)  # sample num - 1 is never drawn
    if step == 3:
      idx[:] = 2  # one sample filling a whole batch
    loss = rng.uniform(0, 3, size=b).astype(np.float32)
    logits = rng.normal(size=(b, c)).astype(np.float32)
    labels = rng.integers(0, c, size=b).astype(np.int32)
    state = update(state, jnp.asarray(idx), jnp.asarray(loss), jnp.asarray(logits), jnp.asarray(labels))
    _record(history, idx, loss, logits, labels)
  summary = signals.tracker_summary(state)
  _check_summary(summary, history, num)
  assert summary["count"][num - 1] == 0 and summary["stability"][num - 1] == 1.0


def test_tracker_regression_losses_only():
  state = signals.tracker_init(3)
  history = [[] for _ in range(3)]
  batches = [([0, 1], [1.0, 4.0]), ([2, 0], [2.0, 0.5]), ([1, 0], [3.0, 0.25])]
  for idx, loss in batches:
    state = signals.tracker_update(state, jnp.array(idx), jnp.array(loss))
    _record(history, idx, loss)
  summary = signals.tracker_summary(state)
  _check_summary(summary, history, 3)
  np.testing.assert_array_equal(summary["cls_count"], 0)
  feats = signals.training_dynamics_features({k: summary[k] for k in ("loss_mean", "loss_std", "loss_slope")})
  assert set(feats) == {"loss_mean", "loss_std", "loss_slope"}


def test_tracker_jit_donated_does_not_recompile():
  traces = []

  def step(state, idx, loss, logits, labels):
    traces.append(None)  # runs only while tracing
    return signals.tracker_update(state, idx, loss, logits, labels)

  update = jax.jit(step, donate_argnums=0)
  state = signals.tracker_init(10)
  rng = np.random.default_rng(10)
  for _ in range(3):
    idx = jnp.asarray(rng.permutation(10)[:4])
    loss = jnp.asarray(rng.uniform(size=4), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    state = update(state, idx, loss, logits, jnp.asarray(rng.integers(0, 3, 4), jnp.int32))
  jax.block_until_ready(state)
  assert len(traces) == 1
  assert update._cache_size() == 1


def test_tracker_rejects_bad_input():
  state = signals.tracker_init(4)
  with pytest.raises(ValueError, match="indices must be pool indices in \\[0, 4\\), got 4"):
    signals.tracker_update(state, jnp.array([0, 4]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="logits and labels must be given together"):
    signals.tracker_update(state, jnp.array([0, 1]), jnp.array([1.0, 2.0]), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
    signals.tracker_init(0)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 2.0"):
    signals.tracker_init(2.0)
  with pytest.raises(ValueError, match="summary lacks"):
    signals.training_dynamics_features({"loss_mean": jnp.zeros(3)})


_property_update = jax.jit(signals.tracker_update)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            hnp.arrays(np.int32, (5,), elements=st.integers(0, 3)),
            hnp.arrays(np.float32, (5,), elements=st.floats(0, 5, width=32)),
            hnp.arrays(np.int32, (5,), elements=st.integers(0, 2)),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_tracker_matches_history_property(steps):
  state = signals.tracker_init(4)
  history = [[] for _ in range(4)]
  labels = np.array([0, 1, 2, 0, 1], np.int32)
  for idx, loss, pred in steps:
    logits = np.eye(3, dtype=np.float32)[pred] * 2.0 + 0.1 * loss[:, None]
    args = (jnp.asarray(idx), jnp.asarray(loss), jnp.asarray(logits), jnp.asarray(labels))
    state = _property_update(state, *args)
    _record(history, idx, loss, logits, labels)
  summary = signals.tracker_summary(state)
  ref = _naive_summary(history, 4)
  for key in ("count", "forgetting", "stability", "correctness"):
    np.testing.assert_allclose(np.asarray(summary[key], np.float64), ref[key], atol=1e-6, err_msg=key)
  for key in ("loss_mean", "loss_std", "loss_slope", "confidence", "variability", "el2n"):
    actual = np.asarray(summary[key], np.float64)
    np.testing.assert_allclose(actual, ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
  assert np.all(np.asarray(summary["stability"]) >= 0) and np.all(np.asarray(summary["stability"]) <= 1)
