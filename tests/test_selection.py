"""Selection methods: conformance under jit, what each rule keeps, the uniform fallbacks and their counts, drop
quality, and bad input refused before any compute."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import blobs, check_method, pool, step_context

from metasel import core, influence, models, persample, selection, train
from metasel.data import synthetic

C = 3
MODEL = models.MLP(hidden=(16,), num_outputs=C)
LOSS = persample.softmax_cross_entropy
FLIPPED = np.arange(96) % 4 == 0


def _methods():
  ghost, lai = influence.ghost_scorer(MODEL, LOSS), influence.lai_scorer(MODEL, LOSS)
  return {
      "sign-ghost": selection.sign_drop(ghost),
      "sign-lai": selection.sign_drop(lai),
      "sign-lai-last": selection.sign_drop(influence.lai_scorer(MODEL, LOSS, layers="last")),
      "sign-lai-self-means": selection.sign_drop(influence.lai_scorer(MODEL, LOSS, form="means", reference="batch")),
      "top-k": selection.top_k(lai, 8),
      "greats": selection.greats(ghost, 8, 1e-2),
      "self-paced": selection.self_paced(MODEL, LOSS),
      "random-drop": selection.random_drop(0.25),
      "oracle": selection.oracle(FLIPPED),
  }


METHODS = _methods()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_selection_method_conforms_under_jit(name):
  checked = check_method(METHODS[name], MODEL, LOSS, blobs())
  state = checked.second.method_state
  # Every step of the two epochs is counted: as selecting (its 16 samples seen), or as a uniform fallback.
  assert int(state.step) == 12 and int(state.nan_skips) == 0
  assert int(state.seen.sum()) + 16 * int(state.empty_steps) == 12 * 16
  assert np.all(np.asarray(state.dropped) <= np.asarray(state.seen))
  if name in ("top-k", "greats"):
    np.testing.assert_allclose(checked.step_metrics["drop_rate"], 0.5)
    assert int(state.dropped.sum()) == 12 * 8
  if name == "oracle":
    np.testing.assert_array_equal(np.asarray(state.dropped) > 0, FLIPPED)


# ----------------------------------------------------------------------------------------------------
# What the rules keep, on hand-made scores


def _fixed(scores_of=lambda x: x[:, 0], pairs_of=lambda x: x @ x.T, name="fixed") -> influence.Scorer:
  """A scorer whose scores are a function of the batch's features (the first column by default)."""
  return influence.Scorer(
      name, lambda params, x, y, val_x, val_y, tape=None: scores_of(x), lambda params, x, y, tape=None: pairs_of(x)
  )


def _ctx(column, rows=None) -> core.StepContext:
  """A context whose batch's first feature column is `column` (B,), at pool rows `rows` of a pool of 10."""
  column = jnp.asarray(column, jnp.float32)
  size = column.shape[0]
  x = jnp.stack([column, jnp.linspace(-1.0, 1.0, size)], axis=1)
  rows = jnp.arange(size) if rows is None else jnp.asarray(rows)
  return core.StepContext({}, core.Batch(rows, x, jnp.zeros(size, jnp.int32)), x[:3], jnp.zeros(3, jnp.int32), jax.random.key(0))


@functools.cache
def _stepper(method: core.Method):
  """One jitted step of a method: (state, ctx) -> (weights, metrics of weights and update, new state)."""

  def step(state, ctx):
    weights, carry, metrics = method.weights(state, ctx)
    size = ctx.batch.y.shape[0]
    result = core.StepResult(jnp.zeros(size), ctx.params, lambda cotangent: jnp.zeros(size))
    new, more = method.update(state, ctx, result, carry)
    return weights, {**metrics, **more}, new

  return jax.jit(step)


SCORES = [0.5, -1.0, 0.0, 2.0, -0.1, 3.0, -2.0, 0.0]
ROWS = [9, 0, 3, 4, 1, 7, 2, 5]


def test_sign_drop_keeps_exactly_the_non_negative_scores():
  method = selection.sign_drop(_fixed())
  weights, metrics, state = _stepper(method)(method.init(jax.random.key(0), 10), _ctx(SCORES, ROWS))
  keep = np.array(SCORES) >= 0  # zero is kept
  np.testing.assert_allclose(weights, keep / keep.sum(), rtol=1e-6)
  assert float(metrics["drop_rate"]) == pytest.approx(3 / 8) and float(metrics["negative_share"]) == pytest.approx(3 / 8)
  assert float(metrics["selecting"]) == 1.0
  seen, dropped = np.zeros(10, int), np.zeros(10, int)
  seen[ROWS] = 1
  dropped[np.array(ROWS)[~keep]] = 1
  np.testing.assert_array_equal(state.seen, seen)
  np.testing.assert_array_equal(state.dropped, dropped)
  assert (int(state.step), int(state.nan_skips), int(state.empty_steps)) == (1, 0, 0)


def test_sign_drop_on_ghost_influence_keeps_the_samples_that_help_the_validation_batch():
  dataset = blobs()
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  scorer = influence.ghost_scorer(MODEL, LOSS)
  # The context carries the batch's tape, as in the loop; the scores below record their own.
  ctx = step_context(MODEL, LOSS, params, pool(dataset), np.arange(32), 16, jax.random.key(0))
  scores = np.asarray(jax.jit(scorer.scores)(params, ctx.batch.x, ctx.batch.y, ctx.val_x, ctx.val_y))
  method = selection.sign_drop(scorer)
  weights, metrics, _ = _stepper(method)(method.init(jax.random.key(0), 96), ctx)
  clear = np.abs(scores) > 1e-5 * np.abs(scores).max()  # no sign to argue about
  assert 0 < np.sum(scores < 0) < 32 and clear.sum() >= 30
  np.testing.assert_array_equal((np.asarray(weights) > 0)[clear], (scores >= 0)[clear])
  kept = np.asarray(weights) > 0
  np.testing.assert_allclose(np.asarray(weights)[kept], 1 / kept.sum(), rtol=1e-6)
  assert float(metrics["drop_rate"]) == pytest.approx(1 - kept.mean())


def test_top_k_keeps_the_k_highest_scores():
  method = selection.top_k(_fixed(), 3)
  weights, metrics, state = _stepper(method)(method.init(jax.random.key(0), 10), _ctx(SCORES, ROWS))
  np.testing.assert_allclose(weights, np.isin(np.arange(8), [0, 3, 5]) / 3, rtol=1e-6)
  assert float(metrics["drop_rate"]) == pytest.approx(5 / 8)
  assert int(state.dropped.sum()) == 5 and int(state.seen.sum()) == 8


def test_greats_keeps_its_greedy_pick_of_k():
  pairs = lambda x: jnp.outer(x[:, 1], x[:, 1]) + jnp.eye(x.shape[0])  # noqa: E731
  method = selection.greats(_fixed(pairs_of=pairs), 4, 0.7)
  ctx = _ctx(SCORES, ROWS)
  weights, _, _ = _stepper(method)(method.init(jax.random.key(0), 10), ctx)
  picked = influence.greats(jnp.asarray(SCORES), pairs(ctx.batch.x), 4, 0.7)
  assert int(picked.sum()) == 4
  np.testing.assert_allclose(weights, np.asarray(picked) / 4, rtol=1e-6)


def test_self_paced_keeps_losses_up_to_the_median_validation_loss():
  dataset = blobs()
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  ctx = step_context(MODEL, LOSS, params, pool(dataset), np.arange(16), 9, jax.random.key(0))
  method = selection.self_paced(MODEL, LOSS)
  weights, _, _ = _stepper(method)(method.init(jax.random.key(0), 96), ctx)
  threshold = np.median(np.asarray(persample.losses(MODEL, params, ctx.val_x, ctx.val_y, LOSS)))
  keep = np.asarray(ctx.losses) <= threshold
  assert 0 < keep.sum() < 16
  np.testing.assert_allclose(weights, keep / keep.sum(), rtol=1e-6)
  # A context without the loop's forward pass (no losses) gives the same weights.
  bare = core.StepContext(params, ctx.batch, ctx.val_x, ctx.val_y, ctx.key)
  np.testing.assert_allclose(_stepper(method)(method.init(jax.random.key(0), 96), bare)[0], weights, rtol=1e-6)


def test_random_drop_drops_about_its_rate():
  method = selection.random_drop(0.25)
  state = method.init(jax.random.key(0), 10)
  kept = [np.asarray(_stepper(method)(state, _ctx(np.zeros(64))._replace(key=jax.random.key(i)))[0]) > 0 for i in range(8)]
  assert 0.15 < 1 - np.mean(kept) < 0.35
  assert not all(np.array_equal(kept[0], k) for k in kept[1:])  # the draws follow the step's key


# ----------------------------------------------------------------------------------------------------
# Uniform fallbacks and their counts


def _counted_state(method, size=10):
  """A state part-way through a run: some counts already taken."""
  state = method.init(jax.random.key(0), size)
  return state._replace(
      seen=jnp.arange(size, dtype=jnp.int32), dropped=jnp.arange(size, dtype=jnp.int32) // 2,
      nan_skips=jnp.int32(2), empty_steps=jnp.int32(3), step=jnp.int32(7),
  )


def _assert_only_changed(before, after, **changed):
  for field in before._fields:
    expected = changed.get(field, getattr(before, field))
    np.testing.assert_array_equal(getattr(after, field), expected, err_msg=field)


def test_nothing_is_scored_or_counted_before_start_step():
  method = selection.sign_drop(_fixed(), start_step=2)
  state = method.init(jax.random.key(0), 10)
  ctx = _ctx(SCORES, ROWS)
  for step in range(2):
    weights, metrics, new = _stepper(method)(state, ctx)
    np.testing.assert_allclose(weights, np.full(8, 1 / 8), rtol=1e-6)
    assert float(metrics["drop_rate"]) == 0.0 and float(metrics["selecting"]) == 0.0
    assert float(metrics["negative_share"]) == 0.0
    _assert_only_changed(state, new, step=step + 1)
    state = new
  weights, metrics, state = _stepper(method)(state, ctx)
  assert float(metrics["selecting"]) == 1.0 and int(state.seen.sum()) == 8 and int(state.dropped.sum()) == 3
  # Nor are NaN scores counted before the start.
  nan_method = selection.sign_drop(_fixed(lambda x: x[:, 0] * jnp.nan), start_step=1)
  _, _, state = _stepper(nan_method)(nan_method.init(jax.random.key(0), 10), ctx)
  assert int(state.nan_skips) == 0
  _, _, state = _stepper(nan_method)(state, ctx)
  assert int(state.nan_skips) == 1


def test_nan_scores_train_uniformly_and_count_one_skip():
  scores = np.array(SCORES)
  scores[3] = np.nan
  method = selection.sign_drop(_fixed())
  before = _counted_state(method)
  weights, metrics, after = _stepper(method)(before, _ctx(scores, ROWS))
  np.testing.assert_allclose(weights, np.full(8, 1 / 8), rtol=1e-6)
  assert float(metrics["selecting"]) == 0.0 and float(metrics["drop_rate"]) == 0.0
  assert float(metrics["nan_skipped"]) == 1.0 and float(metrics["empty_selection"]) == 0.0  # this step's share
  _assert_only_changed(before, after, nan_skips=3, step=8)


def test_a_rule_that_keeps_nothing_trains_uniformly_and_counts_an_empty_step():
  method = selection.sign_drop(_fixed(lambda x: -1.0 - jnp.abs(x[:, 0])))
  before = _counted_state(method)
  weights, metrics, after = _stepper(method)(before, _ctx(SCORES, ROWS))
  np.testing.assert_allclose(weights, np.full(8, 1 / 8), rtol=1e-6)
  assert float(metrics["selecting"]) == 0.0 and float(metrics["negative_share"]) == 1.0
  assert float(metrics["empty_selection"]) == 1.0 and float(metrics["nan_skipped"]) == 0.0
  _assert_only_changed(before, after, empty_steps=4, step=8)


def test_drop_quality_counts_visits_of_selecting_steps():
  state = selection.SelectionState(
      seen=jnp.array([2, 2, 1, 0, 3]), dropped=jnp.array([2, 1, 0, 0, 1]), nan_skips=jnp.int32(0),
      empty_steps=jnp.int32(0), step=jnp.int32(5),
  )
  corrupt = np.array([True, False, True, True, False])
  quality = selection.drop_quality(state, corrupt)
  # Drops: 4, of which 2 corrupt; corrupt visits: 2 + 1 + 0 = 3; visits: 8.
  assert quality == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "drop_rate": 4 / 8})
  none_dropped = selection.drop_quality(state._replace(dropped=jnp.zeros(5, jnp.int32)), corrupt)
  assert np.isnan(none_dropped["precision"]) and none_dropped["recall"] == 0.0 and none_dropped["drop_rate"] == 0.0
  assert np.isnan(selection.drop_quality(state, np.zeros(5, bool))["recall"])
  with pytest.raises(ValueError, match=r"corrupt mask has shape \(4,\); expected one entry per pool sample \(5,\)"):
    selection.drop_quality(state, corrupt[:4])


# ----------------------------------------------------------------------------------------------------
# In the training loop


def test_oracle_drops_exactly_the_flipped_labels_and_keeping_all_trains_like_uniform():
  noisy = synthetic.label_noise(blobs(), 0.25, kind="cyclic", offset=2)
  flipped = noisy.train.tier != 0
  config = train.TrainConfig(epochs=2, batch_size=16, val_batch_size=16, learning_rate=1e-2, track_dynamics=False)
  method = selection.oracle(flipped)
  result = train.fit(MODEL, noisy, config, method)
  quality = selection.drop_quality(result.state.method_state, flipped)
  assert quality["precision"] == 1.0 and quality["recall"] == 1.0
  assert quality["drop_rate"] == pytest.approx(0.25)
  assert all(np.isfinite(record["train/loss"]) for record in result.history)
  # The same oracle told to drop nothing (same compiled epoch) trains exactly like plain training.
  keep_all = method._replace(init=lambda key, n: method.init(key, n)._replace(rule=jnp.zeros(n, bool)))
  kept, plain = train.fit(MODEL, noisy, config, keep_all), train.fit(MODEL, noisy, config)
  assert int(kept.state.method_state.dropped.sum()) == 0
  for a, b in zip(jax.tree.leaves(kept.state.params), jax.tree.leaves(plain.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_cyclic_label_noise_shifts_every_flipped_label_by_the_offset(offset):
  clean = blobs(classes=4)
  noisy = synthetic.label_noise(clean, 0.3, seed=1, kind="cyclic", offset=offset)
  flipped = noisy.train.tier != 0
  assert flipped.sum() == round(0.3 * 96)
  np.testing.assert_array_equal(noisy.train.y[flipped], (clean.train.y[flipped] + offset) % 4)
  np.testing.assert_array_equal(noisy.train.y[~flipped], clean.train.y[~flipped])
  np.testing.assert_array_equal(noisy.val.y, clean.val.y)
  symmetric = synthetic.label_noise(clean, 0.3, seed=1)
  assert np.all(symmetric.train.y[flipped] != clean.train.y[flipped])


def test_label_noise_refuses_an_unknown_kind_or_offset():
  with pytest.raises(ValueError, match=r"unknown kind 'pairwise'; expected one of \('symmetric', 'cyclic'\)"):
    synthetic.label_noise(blobs(), 0.2, kind="pairwise")
  with pytest.raises(ValueError, match=r"offset must be an integer in \[1, 2\], got 3"):
    synthetic.label_noise(blobs(), 0.2, kind="cyclic", offset=3)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_settings_are_refused_when_the_method_is_made():
  fixed = _fixed()
  with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
    selection.top_k(fixed, 0)
  with pytest.raises(ValueError, match="k must be an integer >= 1, got 2.5"):
    selection.greats(fixed, 2.5, 0.1)
  with pytest.raises(ValueError, match="step_size must be a positive finite number, got 0.0"):
    selection.greats(fixed, 2, 0.0)
  with pytest.raises(ValueError, match="random_drop needs a drop rate below 1 .* got 1.0"):
    selection.random_drop(1.0)
  for rate in (1.5, -0.1):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0.0, 1.0\]"):
      selection.random_drop(rate)
  with pytest.raises(ValueError, match="start_step must be an integer >= 0, got -1"):
    selection.sign_drop(fixed, start_step=-1)
  with pytest.raises(ValueError, match=r"oracle needs a boolean mask \(num_train,\).*got float64 of shape \(96,\)"):
    selection.oracle(np.zeros(96))


@pytest.mark.parametrize("method", ["top_k", "greats"])
def test_k_larger_than_the_candidate_batch_is_refused(method):
  make = selection.top_k if method == "top_k" else functools.partial(selection.greats, step_size=0.1)
  chosen = make(_fixed(), 9)
  with pytest.raises(ValueError, match=f"{method} keeps k=9 of each batch, but the candidate batch has only 8 samples"):
    jax.jit(chosen.weights)(chosen.init(jax.random.key(0), 10), _ctx(SCORES, ROWS))


def test_bad_pool_masks_and_layer_sets_are_refused_before_training():
  dataset = blobs()
  config = train.TrainConfig(epochs=1, batch_size=16, val_batch_size=16)
  with pytest.raises(ValueError, match="oracle's mask has 95 entries but the training pool has 96 samples"):
    train.fit(MODEL, dataset, config, selection.oracle(np.zeros(95, bool)))
  wrong = selection.sign_drop(influence.lai_scorer(MODEL, LOSS, layers=("Dense_0", "head")))
  with pytest.raises(ValueError, match=r"names layers the model does not have \(\['head'\]\).*\['Dense_0', 'Dense_1'\]"):
    train.fit(MODEL, dataset, config, wrong)


@pytest.mark.parametrize("scorer", ["ghost", "lai"])
def test_a_validation_batch_of_another_shape_is_refused(scorer):
  make = influence.ghost_scorer if scorer == "ghost" else influence.lai_scorer
  method = selection.sign_drop(make(MODEL, LOSS))
  dataset = blobs()
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  ctx = step_context(MODEL, LOSS, params, pool(dataset), np.arange(16), 16, jax.random.key(0))
  with pytest.raises(ValueError, match=r"validation batch has samples of shape \(4,\), the training batch \(5,\)"):
    jax.jit(method.weights)(method.init(jax.random.key(0), 96), ctx._replace(val_x=ctx.val_x[:, :4]))


def test_greats_skips_a_step_whose_interactions_are_not_finite():
  method = selection.greats(_fixed(pairs_of=lambda x: (x @ x.T).at[0, 1].set(jnp.nan)), 4, 0.5)
  before = _counted_state(method)
  weights, metrics, after = _stepper(method)(before, _ctx(SCORES, ROWS))
  np.testing.assert_allclose(weights, np.full(8, 1 / 8), rtol=1e-6)
  assert float(metrics["nan_skipped"]) == 1.0
  _assert_only_changed(before, after, nan_skips=3, step=8)


def test_greats_picks_k_distinct_samples_even_from_non_finite_scores():
  scores = jnp.array([1.0, jnp.nan, -jnp.inf, 0.5, -jnp.inf, 2.0])
  picked = influence.greats(scores, jnp.zeros((6, 6)), np.int64(5), 1.0)
  assert int(picked.sum()) == 5 and bool(picked[5]) and bool(picked[0]) and bool(picked[3])


def test_oracles_and_random_drops_share_one_compiled_epoch():
  """The mask and the rate live in the state, so new oracles and rates reuse the compiled epoch."""
  noisy = synthetic.label_noise(blobs(), 0.25, kind="cyclic")
  config = train.TrainConfig(epochs=1, batch_size=16, val_batch_size=16, track_dynamics=False)
  flips = noisy.train.tier != 0
  for make in (lambda i: selection.oracle(np.roll(flips, i)), lambda i: selection.random_drop(0.1 + 0.2 * i)):
    jax.clear_caches()
    for i in range(2):
      train.fit(MODEL, noisy, config, make(i))
    assert train._fit_epoch._cache_size() == 1
