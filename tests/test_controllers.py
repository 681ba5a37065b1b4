"""The signal-driven controllers: distributions, unbiasedness, schedules, conformance and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conformance import blobs, check_method, pool, step_context
from metasel import controllers, models, persample, train
from metasel.controllers import scores as scoring
from metasel.controllers.infobatch import _prune

N = 96
TOTAL = 40


@pytest.fixture(scope="module")
def dataset():
  return blobs(N, seed=1)


@pytest.fixture(scope="module")
def model():
  return models.MLP((16,), num_outputs=3)


def _controllers(model):
  pilot = np.random.default_rng(0).normal(size=N)
  return {
      "curriculum": (controllers.curriculum(pilot, ramp_steps=TOTAL // 2), True),
      "random-order": (controllers.random_order_curriculum(ramp_steps=TOTAL // 2), True),
      "rescoring": (controllers.rescoring(total_steps=TOTAL), True),
      "rescoring-refresh": (controllers.rescoring(total_steps=TOTAL, refresh_every=5, model=model), True),
      "rescoring-unbiased": (controllers.rescoring(total_steps=TOTAL, importance_weighted=True), False),
      "entropy": (controllers.entropy_rescoring(total_steps=TOTAL), True),
      "variability": (controllers.entropy_rescoring("variability", total_steps=TOTAL), True),
      "margin-low": (controllers.rescoring("margin", prefer="low", total_steps=TOTAL), True),
      "table": (controllers.rescoring("table", table=pilot, total_steps=TOTAL), True),
      "random-scores": (controllers.random_scores(total_steps=TOTAL), True),
      "importance-k1": (controllers.importance_sampling(8, threshold=1.0), False),
      "importance-k0.5": (controllers.importance_sampling(8, exponent=0.5), False),
      "weighting-mild": (controllers.loss_weighting(0.5), True),
      "weighting-aggressive": (controllers.loss_weighting(2.0, signal="el2n"), True),
      "infobatch": (controllers.infobatch(total_steps=TOTAL, pass_steps=6), False),
  }


@pytest.mark.parametrize("name", list(_controllers(models.MLP((4,), num_outputs=3))))
def test_every_controller_passes_the_method_conformance_check(name, dataset, model):
  method, normalised = _controllers(model)[name]
  checked = check_method(method, model, persample.softmax_cross_entropy, dataset, normalised=normalised)
  if method.probs is not None:
    for state in (checked.initial, checked.second):
      probs = np.asarray(method.probs(state.method_state))
      assert probs.shape == (N,) and np.all(probs >= 0)
      np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["random-order", "rescoring", "random-scores", "importance-k1", "infobatch"])
def test_controllers_reproduce_with_a_seed_and_differ_across_seeds(name, dataset, model):
  method, _ = _controllers(model)[name]
  configs = [
      train.TrainConfig(epochs=2, batch_size=24, val_batch_size=16, learning_rate=1e-2, track_dynamics=False, seed=seed)
      for seed in (0, 0, 5)
  ]
  runs = [train.fit(model, dataset, config, method) for config in configs]
  params = [jax.tree.leaves(r.state.params)[0] for r in runs]
  np.testing.assert_array_equal(params[0], params[1])
  assert not np.allclose(params[0], params[2])
  if method.probs is not None:
    np.testing.assert_array_equal(method.probs(runs[0].state.method_state), method.probs(runs[1].state.method_state))


# ----------------------------------------------------------------------------------------------------
# Schedules against hand values


def test_pacing_matches_hand_values():
  steps = jnp.array([0, 5, 10, 20, 30])
  np.testing.assert_allclose(scoring.pacing(steps, 0.2, 20), [0.2, 0.4, 0.6, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(scoring.pacing(jnp.array([0, 7]), 1.0, 10), [1.0, 1.0])


def test_curriculum_exposes_the_easiest_prefix_and_the_random_order_a_random_one():
  scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 9.0, 8.0, 7.0, 6.0])
  method = controllers.curriculum(scores, ramp_steps=10, start=0.3)
  state = method.init(jax.random.key(0), 10)
  np.testing.assert_allclose(method.probs(state), np.where(np.isin(np.arange(10), [5, 1, 3]), 1 / 3, 0.0), rtol=1e-6)
  state = state._replace(step=jnp.asarray(5))  # g = 0.65: the 7 easiest
  assert set(np.flatnonzero(method.probs(state))) == {5, 1, 3, 4, 2, 0, 9}
  hard_first = controllers.curriculum(scores, ramp_steps=10, start=0.3, easy_first=False)
  assert set(np.flatnonzero(hard_first.probs(hard_first.init(jax.random.key(0), 10)))) == {6, 7, 8}
  control = controllers.random_order_curriculum(ramp_steps=10, start=0.3)
  chosen = [set(np.flatnonzero(control.probs(control.init(jax.random.key(k), 10)))) for k in range(2)]
  assert all(len(c) == 3 for c in chosen) and chosen[0] != chosen[1]


def test_pressure_anneals_log_linearly_and_rank_probs_span_it():
  steps = jnp.array([0, 50, 100, 150])
  np.testing.assert_allclose(scoring.annealed_pressure(steps, (100.0, 1.0), 100), [100.0, 10.0, 1.0, 1.0], rtol=1e-5)
  scores = jnp.array([0.5, 3.0, 1.0, 2.0])
  p = np.asarray(scoring.rank_probs(scores, jnp.asarray(16.0), jnp.zeros(4)))
  expected = np.exp(-np.log(16.0) * np.array([3, 0, 2, 1]) / 4)  # ranks of 0.5, 3, 1, 2
  np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-5)
  np.testing.assert_allclose(scoring.rank_probs(scores, jnp.asarray(1.0), jnp.zeros(4)), 0.25, rtol=1e-6)


def test_unseen_samples_rank_first_and_the_table_keeps_last_seen_values(dataset, model):
  method = controllers.rescoring(total_steps=10)
  state = method.init(jax.random.key(0), N)
  np.testing.assert_allclose(method.probs(state).sum(), 1.0, rtol=1e-6)
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  ctx = step_context(model, persample.softmax_cross_entropy, params, pool(dataset), np.arange(8), 8, jax.random.key(1))
  _, carry, _ = method.weights(state, ctx)
  state, _ = method.update(state, ctx, None, carry)
  np.testing.assert_allclose(state.table.values[:8], ctx.losses, rtol=1e-6)
  probs = np.asarray(method.probs(state))
  assert probs[8:].min() > probs[:8].max()  # unseen first


# ----------------------------------------------------------------------------------------------------
# Unbiasedness


def _per_sample_grads(model, dataset):
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
  grads = persample.grads(model, params, x, y, persample.softmax_cross_entropy)
  return jnp.concatenate([g.reshape(N, -1) for g in jax.tree.leaves(grads)], axis=1)  # (N, P)


def test_importance_weights_give_the_pool_gradient_by_enumeration(model, dataset):
  grads = _per_sample_grads(model, dataset)
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(3), (N,)) * 2)
  # One draw i with probability p_i, weight 1 / (N p_i): E = sum_i p_i w_i g_i.
  weights = jax.vmap(lambda i: controllers.importance_weights(probs, i[None])[0])(jnp.arange(N))
  np.testing.assert_allclose(jnp.sum((probs * weights)[:, None] * grads, 0), grads.mean(0), rtol=1e-4, atol=1e-6)


def test_unbiased_rescoring_weights_are_importance_weights(model, dataset):
  method = controllers.rescoring(total_steps=10, importance_weighted=True)
  state = method.init(jax.random.key(0), N)
  state = state._replace(table=state.table._replace(values=jnp.linspace(0, 3, N)))
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  rows = np.array([0, 5, 5, 90])
  ctx = step_context(model, persample.softmax_cross_entropy, params, pool(dataset), rows, 4, jax.random.key(1))
  weights, _, _ = method.weights(state, ctx)
  np.testing.assert_allclose(weights, 1 / (4 * N * np.asarray(method.probs(state))[rows]), rtol=1e-5)


def test_importance_sampling_k1_is_unbiased_over_many_draws(model, dataset):
  grads = _per_sample_grads(model, dataset)[:24]
  method = controllers.importance_sampling(8, threshold=1.0, smoothing=0.0)
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  ctx = step_context(model, persample.softmax_cross_entropy, params, pool(dataset), np.arange(24), 8, jax.random.key(1))
  state = method.init(jax.random.key(0), N)

  def draw(key):
    return method.weights(state, ctx._replace(key=key))[0]

  weights = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(2), 20000))  # (draws, 24)
  assert float(method.weights(state, ctx)[1].active)
  estimate = jnp.mean(weights @ grads, 0)
  np.testing.assert_allclose(estimate, grads.mean(0), atol=0.03 * float(jnp.abs(grads.mean(0)).max()) + 1e-3)
  biased = controllers.importance_sampling(8, exponent=0.0, threshold=1.0, smoothing=0.0)
  mean_biased = jnp.mean(jax.vmap(lambda k: biased.weights(state, ctx._replace(key=k))[0])(jax.random.split(jax.random.key(2), 4000)), 0)
  bound = scoring.output_grad_norm(ctx.outputs, ctx.batch.y)
  assert np.corrcoef(mean_biased, bound)[0, 1] > 0.9  # k = 0: weights follow the bound


def test_importance_sampling_stays_plain_below_its_threshold(model, dataset):
  method = controllers.importance_sampling(8, threshold=1e9)
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  ctx = step_context(model, persample.softmax_cross_entropy, params, pool(dataset), np.arange(24), 8, jax.random.key(1))
  weights, proposed, _ = method.weights(method.init(jax.random.key(0), N), ctx)
  np.testing.assert_allclose(weights, np.r_[np.full(8, 1 / 8), np.zeros(16)])
  assert not bool(proposed.active)


def test_infobatch_is_unbiased_over_pruning_and_sampling():
  values = jnp.concatenate([jnp.linspace(0.0, 2.0, 40), jnp.full((8,), jnp.inf)])  # 8 never seen
  kept, rescale = jax.vmap(lambda k: _prune(values, k, 0.5, jnp.asarray(False)))(jax.random.split(jax.random.key(0), 20000))
  # Given the kept set, sampling B rows with q = 1 / K and weights m / (B N q) gives each kept sample m / N in expectation.
  per_sample = jnp.mean(kept * rescale, 0) / values.shape[0]
  np.testing.assert_allclose(per_sample, 1 / values.shape[0], rtol=0.04)
  assert bool(jnp.all(kept[:, 40:]))  # unseen samples are never dropped
  full, _ = _prune(values, jax.random.key(1), 0.5, jnp.asarray(True))
  assert bool(jnp.all(full))


def test_loss_weighting_follows_the_clipped_power_of_the_loss(model, dataset):
  params = models.init(model, jax.random.key(0), dataset.input_shape)
  ctx = step_context(model, persample.softmax_cross_entropy, params, pool(dataset), np.arange(16), 8, jax.random.key(1))
  ctx = ctx._replace(losses=jnp.array([0.001, 1.0, 2.0, 3.0] * 4))
  weights = controllers.loss_weighting(2.0, max_ratio=4.0).weights((), ctx)[0]
  ratio = np.clip((np.asarray(ctx.losses) / np.mean(ctx.losses)) ** 2, 0.25, 4.0)
  np.testing.assert_allclose(weights, ratio / ratio.sum(), rtol=1e-5)
  np.testing.assert_allclose(controllers.loss_weighting(0.0).weights((), ctx)[0], 1 / 16, rtol=1e-6)


def test_output_grad_norm_is_el2n_for_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  el2n = jnp.linalg.norm(jax.nn.softmax(logits) - jax.nn.one_hot(labels, 4), axis=-1)
  np.testing.assert_allclose(scoring.output_grad_norm(logits, labels), el2n, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: controllers.curriculum(np.zeros(4), ramp_steps=5, start=0.0), "pacing start"),
        (lambda: controllers.random_order_curriculum(ramp_steps=5, start=1.5), "pacing start"),
        (lambda: controllers.rescoring(total_steps=5, pressure=(0.5, 1.0)), "selection pressure"),
        (lambda: controllers.rescoring(total_steps=5, pressure=(100.0, 0.9)), "selection pressure"),
        (lambda: controllers.rescoring("lossy", total_steps=5), "unknown signal"),
        (lambda: controllers.rescoring("table", total_steps=5), "signal 'table'"),
        (lambda: controllers.rescoring("forgetting", total_steps=5, refresh_every=3, model=models.MLP((2,))), "refresh_every"),
        (lambda: controllers.entropy_rescoring("loss", total_steps=5), "signal"),
        (lambda: controllers.loss_weighting(-0.5), "alpha must be a number in"),
        (lambda: controllers.importance_sampling(8, exponent=-1.0), "exponent must be a number in"),
        (lambda: controllers.importance_sampling(8, signal="random"), "bound"),
        (lambda: controllers.curriculum(np.array([0.0, np.nan]), ramp_steps=5), "curriculum scores"),
        (lambda: controllers.infobatch(total_steps=5, pass_steps=0), "pass_steps"),
    ],
)
def test_bad_settings_are_refused_before_compute(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_a_presample_smaller_than_b_and_a_wrong_sized_table_are_refused(model, dataset):
  config = train.TrainConfig(epochs=1, batch_size=4, val_batch_size=16, track_dynamics=False)
  with pytest.raises(ValueError, match="presample B >= b"):
    train.fit(model, dataset, config, controllers.importance_sampling(8))
  with pytest.raises(ValueError, match="cover 5 samples"):
    train.fit(model, dataset, config, controllers.curriculum(np.zeros(5), ramp_steps=3))
  with pytest.raises(ValueError, match=r"shape \(96,\)"):
    train.fit(model, dataset, config, controllers.rescoring("table", table=np.zeros(5), total_steps=3))


def test_steps_per_epoch_sets_the_evaluation_points_and_keeps_one_pass_epochs(model, dataset):
  base = train.TrainConfig(epochs=2, batch_size=16, val_batch_size=16, track_dynamics=False)
  same = train.TrainConfig(epochs=2, batch_size=16, val_batch_size=16, track_dynamics=False, steps_per_epoch=N // 16)
  a, b = train.fit(model, dataset, base), train.fit(model, dataset, same)
  np.testing.assert_array_equal(jax.tree.leaves(a.state.params)[0], jax.tree.leaves(b.state.params)[0])
  short = train.fit(model, dataset, train.TrainConfig(epochs=3, batch_size=16, val_batch_size=16, track_dynamics=False, steps_per_epoch=4))
  assert [r["step"] for r in short.history] == [4, 8, 12]


def test_controllers_are_values_and_per_run_data_are_their_leaves():
  """Equal settings give equal, hashable records; records differing only in per-run arrays (an order, a table)
  have one pytree structure, those arrays being their leaves, so `fit` compiles one epoch for both."""
  rng = np.random.default_rng(0)
  equal = [
      (controllers.random_scores(total_steps=9), controllers.random_scores(total_steps=9)),
      (controllers.importance_sampling(8, exponent=0.5), controllers.importance_sampling(8, exponent=0.5)),
      (controllers.loss_weighting(2.0), controllers.loss_weighting(2.0)),
      (controllers.infobatch(total_steps=9, pass_steps=3), controllers.infobatch(total_steps=9, pass_steps=3)),
  ]
  for a, b in equal:
    assert a == b and hash(a) == hash(b), a.name
  assert controllers.loss_weighting(2.0) != controllers.loss_weighting(0.5)
  per_run = [
      (controllers.curriculum(rng.random(N), ramp_steps=10), controllers.curriculum(rng.random(N), ramp_steps=10)),
      (controllers.rescoring("table", table=rng.random(N), total_steps=9), controllers.rescoring("table", table=rng.random(N), total_steps=9)),
  ]
  dataset = blobs(N)
  config = train.TrainConfig(epochs=1, batch_size=16, val_batch_size=16, track_dynamics=False)
  for a, b in per_run:
    assert a != b and jax.tree.structure(a) == jax.tree.structure(b), a.name
    jax.clear_caches()
    for method in (a, b):
      train.fit(models.MLP((4,), num_outputs=3), dataset, config, method)
    assert train._fit_epoch._cache_size() == 1, a.name
