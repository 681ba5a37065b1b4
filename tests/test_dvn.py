"""DVN: contributions against a per-sample loop, first-order limit, proxy features, spearman and the samplers."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from metasel import checks, data, dvn, ghost, models, persample, signals, tape, train
from metasel.core import Batch, StepContext, StepResult

ETA = 0.5
SINE = dict(seed=0, n_train=128, n_val=64, n_test=64)
CONFIG = train.TrainConfig(epochs=2, batch_size=16, val_batch_size=16, learning_rate=1e-2, seed=0)
SAMPLER_MODEL = models.MLP((16,), num_outputs=1)

contributions = jax.jit(dvn.contributions, static_argnums=(0, 1), static_argnames="method")
first_order_contributions = jax.jit(dvn.first_order_contributions, static_argnums=(0, 1))
vmap_grad_norms = jax.jit(
    lambda model, params, x, y, loss_fn: persample.grad_norms(model, params, x, y, loss_fn, method="vmap"),
    static_argnums=(0, 4),
)


def _arrays(split):
  return jnp.asarray(split.x), jnp.asarray(split.y)


def _classifier_problem(seed=0):
  """An MLP classifier on a small Gaussian mixture: model, params, train and validation arrays."""
  ds = data.load("mixture", seed=seed, n_real=8, n_synthetic=8, n_val=24, n_test=8, dim=8, num_classes=3)
  model = models.MLP((16, 16), num_outputs=3)
  params = models.init(model, jax.random.key(seed), (8,))
  return model, persample.softmax_cross_entropy, params, *_arrays(ds.train), *_arrays(ds.val)


def _regression_problem(seed=0):
  """A tanh MLP regressor on noisy sine data."""
  ds = data.load("sine", seed=seed, n_train=12, n_val=24, n_test=8)
  model = models.MLP((16, 16), num_outputs=1, activation=jnp.tanh)
  params = models.init(model, jax.random.key(seed), (1,))
  return model, persample.squared_error, params, *_arrays(ds.train), *_arrays(ds.val)


class _GroupedCNN(nn.Module):
  """A grouped convolution (which the tape does not take: its kernel falls back to vmap) under a dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2)(x))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    return nn.Dense(3)(nn.relu(nn.Dense(8)(h.reshape(h.shape[0], -1))))


def _image_problem(seed=0, grouped=False):
  """A small CNN on random 8 x 8 images with three classes (two channels for the grouped convolution)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  channels = 2 if grouped else 1
  model = _GroupedCNN() if grouped else models.CNN(channels=(4,), hidden=(8,), num_outputs=3)
  params = models.init(model, keys[0], (8, 8, channels))
  x = jax.random.normal(keys[1], (6, 8, 8, channels), jnp.float32)
  vx = jax.random.normal(keys[2], (10, 8, 8, channels), jnp.float32)
  y = jax.random.randint(keys[3], (6,), 0, 3)
  vy = jax.random.randint(keys[4], (10,), 0, 3)
  return model, persample.softmax_cross_entropy, params, x, y, vx, vy


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _example_grad_fn(model, loss_fn):
  """Jitted `(params, x (1, ...), y (1,)) -> grad` of that single example's loss."""
  return jax.jit(jax.grad(lambda p, xi, yi: persample.losses(model, p, xi, yi, loss_fn)[0]))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_sample_contribution(model, loss_fn, params, x_i, y_i, vx, vy, eta):
  """One sample's exact contribution and its linearisation eta <grad l_i, grad L_val>."""

  def val_loss(p):
    return jnp.mean(persample.losses(model, p, vx, vy, loss_fn))

  g = jax.grad(lambda p: persample.losses(model, p, x_i, y_i, loss_fn)[0])(params)
  exact = val_loss(params) - val_loss(jax.tree.map(lambda v, gv: v - eta * gv, params, g))
  return exact, eta * jnp.vdot(_flat(g), _flat(jax.grad(val_loss)(params)))


def _loop_contributions(model, loss_fn, params, x, y, vx, vy, eta) -> tuple[np.ndarray, np.ndarray]:
  """L_val(theta) - L_val(theta - eta grad l_i(theta)) and its linearisation, one sample at a time."""
  rows = [
      _one_sample_contribution(model, loss_fn, params, x[i : i + 1], y[i : i + 1], vx, vy, eta)
      for i in range(x.shape[0])
  ]
  return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


# ----------------------------------------------------------------------------------------------------
# Contributions


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("problem", [_classifier_problem, _regression_problem], ids=["classifier", "regression"])
def test_contributions_match_per_sample_loop(problem, method):
  model, loss_fn, params, x, y, vx, vy = problem()
  got = np.asarray(contributions(model, loss_fn, params, x, y, vx, vy, ETA, method=method))
  want, linear = _loop_contributions(model, loss_fn, params, x, y, vx, vy, ETA)
  assert got.shape == (x.shape[0],)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  # At this step size the exact value is far from its linearisation, so the check above is non-trivial.
  assert np.max(np.abs(want - linear)) > 100 * 2e-5


@pytest.mark.filterwarnings("ignore:.*take the slow vmap path")
@pytest.mark.parametrize("grouped", [False, True], ids=["conv-taped", "grouped-conv-fallback"])
def test_contributions_ghost_on_cnn_and_conv_fallback_match_loop(grouped):
  model, loss_fn, params, x, y, vx, vy = _image_problem(grouped=grouped)
  report = persample.coverage(model, params, x)
  if grouped:  # the grouped kernel takes full per-sample gradients, the rest the ghost step
    assert set(report.fallback) == {"Conv_0/kernel", "Conv_0/bias"} and "grouped convolution" in report.fallback["Conv_0/kernel"]
  else:
    assert not report.fallback and {"Conv_0/kernel", "Conv_0/bias"} <= set(report.ghost)
  got = np.asarray(contributions(model, loss_fn, params, x, y, vx, vy, ETA))
  want, linear = _loop_contributions(model, loss_fn, params, x, y, vx, vy, ETA)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert np.max(np.abs(want - linear)) > 100 * 2e-5


def test_contributions_reject_unknown_method():
  model, loss_fn, params, x, y, vx, vy = _classifier_problem()
  with pytest.raises(ValueError, match="method must be 'ghost' or 'vmap'"):
    dvn.contributions(model, loss_fn, params, x, y, vx, vy, ETA, method="loop")


def test_first_order_error_shrinks_like_step_size_squared():
  model, loss_fn, params, x, y, vx, vy = _classifier_problem()
  relative = []
  for eta in (1e-1, 1e-2, 1e-3):
    exact = np.asarray(contributions(model, loss_fn, params, x, y, vx, vy, eta))
    estimate = np.asarray(first_order_contributions(model, loss_fn, params, x, y, vx, vy, eta))
    relative.append(np.max(np.abs(exact - estimate)) / np.max(np.abs(estimate)))
  # Error O(eta^2) over a scale O(eta): the relative error falls about 10x per 10x smaller eta.
  assert relative[0] / relative[1] > 5
  assert relative[1] / relative[2] > 5
  assert relative[2] < 0.05


def test_first_order_is_step_size_times_gradient_dot():
  model, loss_fn, params, x, y, vx, vy = _classifier_problem()
  eta = 0.01
  got = np.asarray(first_order_contributions(model, loss_fn, params, x, y, vx, vy, eta))
  val_grad = _flat(jax.jit(jax.grad(lambda p: jnp.mean(persample.losses(model, p, vx, vy, loss_fn))))(params))
  example_grad = _example_grad_fn(model, loss_fn)
  for i in (0, 3):
    g = _flat(example_grad(params, x[i : i + 1], y[i : i + 1]))
    np.testing.assert_allclose(got[i], eta * float(jnp.vdot(g, val_grad)), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# Ghost steps: a layer's parameters changed in factored form during the taped forward pass


def _layer_info(model, params, x, name):
  """The `LayerInfo` of the taped layer `name` of a linen model on inputs x."""
  fwd = tape.forward(models.as_model(model), params, x)
  return next(call.info for call in fwd.calls if call.info.name == name)


def test_ghost_step_equals_rank_one_parameter_change():
  model = models.MLP((6, 5), num_outputs=3)
  keys = jax.random.split(jax.random.key(1), 4)
  params = models.init(model, keys[0], (4,))
  x = jax.random.normal(keys[1], (7, 4))
  a = jax.random.normal(keys[2], (6,))
  delta = jax.random.normal(keys[3], (5,))
  info = _layer_info(model, params, x, "Dense_1")
  assert info.kind == "dense" and dict(info.roles).keys() == {"kernel", "bias"}
  stepped = jax.jit(lambda p, v, a, d: tape.forward(models.as_model(model), p, v, steps={info.leaves: (a[None], d[None])}))
  got = stepped(params, x, a, delta)
  layer = params["Dense_1"]
  changed = {**params, "Dense_1": {"kernel": layer["kernel"] + jnp.outer(a, delta), "bias": layer["bias"] + delta}}
  want = tape.forward(models.as_model(model), changed, x)
  np.testing.assert_allclose(got.outputs, want.outputs, rtol=1e-5, atol=1e-5)
  # The embedding (the last dense layer's input) is downstream of Dense_1, so it moves with the step too.
  np.testing.assert_allclose(got.embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(want.outputs, model.apply({"params": changed}, x), rtol=1e-6, atol=1e-6)
  plain = model.apply({"params": params}, x)
  assert np.max(np.abs(np.asarray(plain) - np.asarray(want.outputs))) > 1e-2


class _PositionsDense(nn.Module):
  """One dense layer applied to every position of (B, T, in), its outputs flattened to logits (B, T * out)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x).reshape(x.shape[0], -1)


@pytest.mark.parametrize("positions", [1, 2, 40], ids=["rank-one", "rank-two", "formed"])
def test_ghost_step_on_single_dense_layer_with_positions(positions):
  """A step of factors (A (P, in), D (P, out)) adds A^T D to the kernel and sum_p D_p to the bias at every position.

  Few factor rows take the low-rank product (x A^T) D, many the formed A^T D: both must agree with the change.
  """
  model = _PositionsDense()
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (2, 5, 4))  # positions sharing the weights
  params = models.init(model, keys[1], (5, 4))
  a, d = jax.random.normal(keys[2], (positions, 4)), jax.random.normal(keys[3], (positions, 3))
  info = _layer_info(model, params, x, "Dense_0")
  got = tape.forward(models.as_model(model), params, x, steps={info.leaves: (a, d)}).outputs
  want = x @ (params["Dense_0"]["kernel"] + a.T @ d) + params["Dense_0"]["bias"] + d.sum(0)
  np.testing.assert_allclose(got, want.reshape(2, -1), rtol=1e-5, atol=1e-5)
  rows = x.reshape(2, 5, 4)
  np.testing.assert_allclose(ghost.correction(info, rows, (a, d)), rows @ (a.T @ d) + d.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("problem", ["mlp", "cnn", "transformer"])
def test_step_factors_of_one_sample_step_every_taped_layer_by_its_gradient(problem):
  """forward(steps={leaves: step_factors(layer, -eta)[i]}) is the model at theta - eta grad l_i(theta), on new inputs."""
  if problem == "mlp":
    model, loss_fn, params, x, y, vx, _ = _classifier_problem()
  elif problem == "cnn":
    model, loss_fn, params, x, y, vx, _ = _image_problem()
  else:
    model = models.Transformer(vocab_size=20, num_outputs=3, max_length=5, width=8, depth=1, heads=2)
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.randint(keys[0], (4, 5), 1, 20).at[0, 3:].set(0)  # one padded sample
    vx = jax.random.randint(keys[1], (6, 5), 1, 20)
    y = jax.random.randint(keys[2], (4,), 0, 3)
    loss_fn, params = persample.softmax_cross_entropy, models.init(model, jax.random.key(4), (5,), jnp.int32)
  recorded = persample.record(model, params, x, y, loss_fn)
  assert not recorded.skipped
  assert recorded.taped_leaves == frozenset(range(len(jax.tree.leaves(params))))  # every parameter is taped
  kinds = {layer.info.kind for layer in recorded.layers}
  assert kinds == ({"dense", "embed", "norm"} if problem == "transformer" else {"dense"})
  eta = 0.3
  factors = {layer.info.leaves: ghost.step_factors(layer, -eta) for layer in recorded.layers}
  example_grad = _example_grad_fn(model, loss_fn)
  for i in (0, 2):
    one = jax.tree.map(lambda f, i=i: f[i], factors)
    got = tape.forward(models.as_model(model), params, vx, steps=one).outputs
    stepped = jax.tree.map(lambda p, g: p - eta * g, params, example_grad(params, x[i : i + 1], y[i : i + 1]))
    want = persample.outputs(model, stepped, vx)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(np.asarray(want) - np.asarray(persample.outputs(model, params, vx)))) > 1e-3


# ----------------------------------------------------------------------------------------------------
# Sampling distribution


def test_sampling_probs_softmax_with_temperature():
  scores = jnp.array([0.5, -1.0, 2.0, 0.0])
  for temperature in (1.0, 0.3, 4.0):
    got = np.asarray(dvn.sampling_probs(scores, "softmax", temperature))
    e = np.exp(np.array([0.5, -1.0, 2.0, 0.0]) / temperature)
    np.testing.assert_allclose(got, e / e.sum(), rtol=1e-5)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-6)


def test_sampling_probs_unnormalised():
  got = np.asarray(dvn.sampling_probs(jnp.array([1.0, -2.0, 3.0, 0.0]), "none"))
  np.testing.assert_allclose(got, [0.25, 0.0, 0.75, 0.0], rtol=1e-6)
  uniform = np.asarray(dvn.sampling_probs(jnp.array([-1.0, 0.0, -3.0]), "none"))
  np.testing.assert_allclose(uniform, [1 / 3] * 3, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown normalization"):
    dvn.sampling_probs(jnp.zeros(3), "sparsemax")


# ----------------------------------------------------------------------------------------------------
# Spearman


def test_spearman_by_hand_with_ties():
  a = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  b = jnp.array([5.0, 6.0, 7.0, 8.0, 7.0])
  ranks_a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  ranks_b = np.array([1.0, 2.0, 3.5, 5.0, 3.5])  # the two 7s share ranks 3 and 4
  want = np.corrcoef(ranks_a, ranks_b)[0, 1]
  np.testing.assert_allclose(float(dvn.spearman(a, b)), want, rtol=1e-5)
  np.testing.assert_allclose(float(dvn.spearman(a, a**3 - 10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(dvn.spearman(a, -jnp.exp(a))), -1.0, rtol=1e-6)


def test_spearman_matches_scipy_on_ties_and_under_jit():
  rng = np.random.default_rng(0)
  jitted = jax.jit(dvn.spearman)
  for _ in range(5):
    a = rng.integers(0, 4, 40).astype(np.float32)
    b = (a + rng.integers(0, 4, 40)).astype(np.float32)
    want = scipy.stats.spearmanr(a, b).statistic
    np.testing.assert_allclose(float(dvn.spearman(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jitted(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-5, atol=1e-6)


def test_spearman_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same length"):
    dvn.spearman(jnp.zeros(3), jnp.zeros(4))


# ----------------------------------------------------------------------------------------------------
# Proxy features


def test_proxy_feature_columns():
  model, loss_fn, params, x, y, _, _ = _classifier_problem()
  rows = jnp.arange(x.shape[0]) + 100
  features = dvn.proxy_features(model, loss_fn)
  assert features.names == ("loss", "grad_norm", "embedding_norm")
  got = np.asarray(jax.jit(features.fn)(params, x, y, rows))
  # A logits-only MLP's embedding is the input of its last dense layer: the second hidden activation.
  hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  embeddings = jax.nn.relu(hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"])
  np.testing.assert_allclose(got[:, 0], persample.losses(model, params, x, y, loss_fn), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      got[:, 1], vmap_grad_norms(model, params, x, y, loss_fn), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(got[:, 2], np.linalg.norm(np.asarray(embeddings), axis=-1), rtol=1e-5, atol=1e-6)

  table = np.arange(200, dtype=np.float32) * 0.5
  extra = {
      "margin": lambda tape, yb, r: signals.margin(tape.outputs, yb),
      "table": dvn.table_signal(table),
  }
  more = dvn.proxy_features(model, loss_fn, include=("loss", "grad_norm"), extra=extra)
  assert more.names == ("loss", "grad_norm", "margin", "table")  # no embedding norm column
  values = np.asarray(jax.jit(more.fn)(params, x, y, rows))
  assert values.shape == (x.shape[0], 4)
  outputs = model.apply({"params": params}, x)
  np.testing.assert_allclose(values[:, :2], got[:, :2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(values[:, 2], signals.margin(outputs, y), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(values[:, 3], table[np.asarray(rows)])


@pytest.mark.parametrize(
    "include, extra",
    [(("loss", "gradnorm"), None), (("loss", "loss"), None), ((), None), (("loss",), {"loss": lambda t, y, r: y})],
)
def test_proxy_features_reject_bad_names(include, extra):
  model, loss_fn, *_ = _classifier_problem()
  with pytest.raises(ValueError, match="include|extra|at least one"):
    dvn.proxy_features(model, loss_fn, include=include, extra=extra)


def test_table_signal_and_finite_rows_check_name_nan():
  with pytest.raises(ValueError, match=r"forgetting: 1 NaN or inf values \(first: row 1\); expected finite values"):
    dvn.table_signal(np.array([1.0, np.nan, 2.0]), name="forgetting")
  with pytest.raises(ValueError, match="shape"):
    dvn.table_signal(np.zeros((3, 2)))
  table = np.ones((5, 3), np.float32)
  table[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"features: 1 NaN or inf values \(first: row 3, grad_norm\)"):
    checks.check_finite_rows("features", table, ("loss", "grad_norm", "embedding_norm"))
  table[3, 1] = np.inf
  table[4, 0] = np.nan
  with pytest.raises(ValueError, match=r"features: 2 NaN or inf values \(first: row 3, column 1\)"):
    checks.check_finite_rows("features", table)
  checks.check_finite_rows("features", np.ones((5, 3)))


# ----------------------------------------------------------------------------------------------------
# The DVN's pieces: replay memory, value regressor, probe


def test_replay_memory_is_a_ring_of_the_last_probes():
  memory = dvn.memory_init(4, 2)
  assert memory.features.shape == (4, 2) and int(memory.count) == 0
  first = jnp.arange(6.0).reshape(3, 2)
  memory = jax.jit(dvn.memory_add)(memory, first, jnp.array([0.0, 1.0, 2.0]))
  np.testing.assert_array_equal(memory.features[:3], first)
  np.testing.assert_array_equal(dvn.memory_filled(memory), [True, True, True, False])
  second = 10 + jnp.arange(6.0).reshape(3, 2)
  memory = dvn.memory_add(memory, second, jnp.array([3.0, 4.0, 5.0]))  # slots 3, 0, 1: the oldest overwritten
  assert int(memory.count) == 6
  np.testing.assert_array_equal(memory.targets, [4.0, 5.0, 2.0, 3.0])
  np.testing.assert_array_equal(memory.features, np.stack([second[1], second[2], first[2], second[0]]))
  assert bool(jnp.all(dvn.memory_filled(memory)))


@pytest.mark.parametrize("standardize_targets", [True, False], ids=["standardised", "raw"])
def test_regressor_fits_the_filled_part_of_its_memory(standardize_targets):
  keys = jax.random.split(jax.random.key(0), 3)
  network, optimizer = dvn.DVN(hidden=(16,)), optax.adam(1e-2)
  features = jax.random.normal(keys[0], (20, 2))
  targets = 3.0 * features[:, 0] - features[:, 1] + 5.0
  # Half-filled memory of 40: garbage in the empty slots must not enter the fit.
  memory = dvn.memory_add(dvn.memory_init(40, 2)._replace(targets=jnp.full((40,), 1e6)), features, targets)
  regressor = dvn.regressor_init(network, optimizer, keys[1], 2)
  np.testing.assert_array_equal(dvn.regressor_score(network, regressor, features), np.zeros(20))  # zero output layer
  fit = jax.jit(functools.partial(dvn.regressor_fit, network, optimizer, steps=300, standardize_targets=standardize_targets))
  fitted, loss = fit(regressor, memory)
  if standardize_targets:
    np.testing.assert_allclose(fitted.target_mean, np.mean(targets), rtol=1e-5)
    np.testing.assert_allclose(fitted.target_scale, np.std(targets), rtol=1e-5)
  else:
    assert float(fitted.target_mean) == 0.0 and float(fitted.target_scale) == 1.0
  scaled = (targets - fitted.target_mean) / fitted.target_scale
  predicted = dvn.regressor_score(network, fitted, features)
  np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.square(predicted - scaled))), rtol=1e-4)
  assert float(loss) < 0.05 * float(jnp.mean(jnp.square(scaled)))
  assert float(dvn.spearman(predicted, targets)) > 0.95


def test_probe_reads_features_and_contributions_off_one_tape():
  model, loss_fn, params, x, y, vx, vy = _classifier_problem()
  features = dvn.proxy_features(model, loss_fn)
  ctx = StepContext(params, Batch(jnp.arange(4), x[:4], y[:4]), vx, vy, jax.random.key(0), pool=(x, y))
  rows = jnp.array([5, 0, 11, 3])
  probe = jax.jit(dvn.probe, static_argnums=(0, 1, 2), static_argnames=("target", "first_order"))
  exact = probe(model, loss_fn, features, ctx, rows, ETA)
  np.testing.assert_allclose(exact.features, features.fn(params, x[rows], y[rows], rows), rtol=1e-5, atol=1e-6)
  want, _ = _loop_contributions(model, loss_fn, params, x[rows], y[rows], vx, vy, ETA)
  np.testing.assert_allclose(exact.contributions, want, rtol=2e-4, atol=2e-5)
  assert exact.first_order is None
  estimate = np.asarray(first_order_contributions(model, loss_fn, params, x[rows], y[rows], vx, vy, ETA))
  both = probe(model, loss_fn, features, ctx, rows, ETA, first_order=True)
  np.testing.assert_allclose(both.first_order, estimate, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(both.contributions, exact.contributions, rtol=1e-6, atol=1e-7)
  cheap = probe(model, loss_fn, features, ctx, rows, ETA, target="first_order")
  np.testing.assert_allclose(cheap.contributions, estimate, rtol=1e-5, atol=1e-7)
  assert cheap.first_order is None  # given only when asked for: the DVN logs no comparison otherwise
  asked = probe(model, loss_fn, features, ctx, rows, ETA, target="first_order", first_order=True)
  np.testing.assert_array_equal(asked.first_order, asked.contributions)


# ----------------------------------------------------------------------------------------------------
# Samplers in the training loop


@pytest.fixture(scope="module")
def sine():
  return data.load("sine", **SINE)


@pytest.fixture(scope="module")
def dvn_method():
  return dvn.dvn(SAMPLER_MODEL, persample.squared_error, period=2, num_samples=8)


def _pool_probs(method, result):
  return np.asarray(method.probs(result.state.method_state), np.float64)


def test_dvn_sampler_probs_are_a_fitted_distribution_and_reproducible(sine, dvn_method):
  result = train.fit(SAMPLER_MODEL, sine, CONFIG, dvn_method)
  probs = _pool_probs(dvn_method, result)
  assert probs.shape == (len(sine.train),)
  assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
  assert np.ptp(probs) > 1e-6 * probs.max()  # the DVN was fitted, so the scores are no longer all zero

  state = result.state.method_state
  assert int(state.step) == 2 * len(sine.train) // CONFIG.batch_size
  assert int(state.learner.memory.count) == 8 * (int(state.step) // 2)  # one probe every period=2 steps

  again = _pool_probs(dvn_method, train.fit(SAMPLER_MODEL, sine, CONFIG, dvn_method))
  np.testing.assert_array_equal(probs, again)
  other = _pool_probs(dvn_method, train.fit(SAMPLER_MODEL, sine, dataclasses.replace(CONFIG, seed=1), dvn_method))
  assert np.max(np.abs(other - probs)) > 1e-6

  last = result.history[-1]
  for key in ("dvn/spearman", "dvn/first_order_spearman", "dvn/fit_loss", "dvn/probed", "sampler/pool_ess",
              "sampler/max_prob"):
    assert f"train/{key}" in last
  assert last["train/dvn/probed"] == pytest.approx(0.5)
  assert np.isfinite(last["train/dvn/spearman"]) and -1.0 <= last["train/dvn/spearman"] <= 1.0
  assert np.isfinite(last["train/dvn/fit_loss"])


def test_dvn_sampler_unnormalised_trains_without_nan(sine):
  method = dvn.dvn(SAMPLER_MODEL, persample.squared_error, period=2, num_samples=8, normalization="none")
  result = train.fit(SAMPLER_MODEL, sine, dataclasses.replace(CONFIG, epochs=1), method)
  probs = _pool_probs(method, result)
  assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
  assert all(np.isfinite(v) for k, v in result.history[-1].items() if k.startswith(("train/loss", "val/")))


def test_grad_norm_sampler_follows_its_table(sine):
  method = dvn.grad_norm_sampler(SAMPLER_MODEL, persample.squared_error)
  # A tiny SGD step keeps the params, so every row's norm, from the pool pass or a step's tape, is current.
  config = dataclasses.replace(CONFIG, epochs=1, optimizer="sgd", learning_rate=1e-9)
  result = train.fit(SAMPLER_MODEL, sine, config, method)
  state = result.state.method_state
  norms = np.asarray(state.features[:, 0], np.float64)
  x, y = _arrays(sine.train)
  want = vmap_grad_norms(SAMPLER_MODEL, result.state.params, x, y, persample.squared_error)
  np.testing.assert_allclose(norms, want, rtol=1e-3, atol=1e-6)
  probs = _pool_probs(method, result)
  np.testing.assert_allclose(probs, norms / norms.sum(), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
  assert np.ptp(probs) > 0


def _step_context(params, ds, indices, key):
  x, y = _arrays(ds.train)
  vx, vy = _arrays(ds.val)
  indices = jnp.asarray(indices, jnp.int32)
  return StepContext(params, Batch(indices, x[indices], y[indices]), vx[:16], vy[:16], key, pool=(x, y))


@pytest.fixture(scope="module")
def table_steps(sine):
  """A DVN sampler (period 2, K = 6) with its jitted weights and update steps, and its features."""
  method = dvn.dvn(SAMPLER_MODEL, persample.squared_error, period=2, num_samples=6)
  features = dvn.proxy_features(SAMPLER_MODEL, persample.squared_error)

  def update(state, ctx, tape, carry):
    result = StepResult(jnp.zeros(ctx.batch.y.shape), ctx.params, None, tape)
    return method.update(state, ctx, result, carry)

  return method, jax.jit(method.weights), jax.jit(update), jax.jit(features.fn)


@pytest.mark.parametrize("use_tape", [False, True], ids=["no-tape", "tape"])
def test_dvn_table_keeps_pool_and_updates_batch_rows(sine, table_steps, use_tape):
  method, weights, update, feature_fn = table_steps
  loss_fn = persample.squared_error
  p0 = models.init(SAMPLER_MODEL, jax.random.key(0), (1,))
  p1 = jax.tree.map(lambda v: v + 0.3, p0)
  x, y = _arrays(sine.train)

  def tape(ctx):
    return persample.record(SAMPLER_MODEL, ctx.params, ctx.batch.x, ctx.batch.y, loss_fn) if use_tape else None

  initial = method.init(jax.random.key(1), len(sine.train))
  ctx = _step_context(p0, sine, range(8), jax.random.key(2))
  _, carry, metrics = weights(initial, ctx)  # step 0: the pool is measured and the DVN fitted
  assert float(metrics["dvn/probed"]) == 1.0
  assert int(carry.learner.memory.count) == 6 and int(initial.learner.memory.count) == 0
  state, _ = update(initial, ctx, tape(ctx), carry)  # the one state transition of the step
  assert int(state.learner.memory.count) == 6
  pool = np.asarray(feature_fn(p0, x, y, jnp.arange(len(sine.train))))
  np.testing.assert_allclose(state.features, pool, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 1
  scores = np.asarray(state.scores)

  batch = np.arange(20, 28)
  ctx = _step_context(p1, sine, batch, jax.random.key(3))
  _, carry, metrics = weights(state, ctx)  # step 1: no probe
  assert float(metrics["dvn/probed"]) == 0.0
  state, metrics = update(state, ctx, tape(ctx), carry)
  fresh = np.asarray(feature_fn(p1, x[batch], y[batch], jnp.asarray(batch)))
  assert np.max(np.abs(fresh - pool[batch])) > 1e-2
  np.testing.assert_allclose(state.features[batch], fresh, rtol=1e-4, atol=1e-5)
  rest = np.setdiff1d(np.arange(len(sine.train)), batch)
  np.testing.assert_allclose(state.features[rest], pool[rest], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.scores[rest], scores[rest])
  assert np.max(np.abs(np.asarray(state.scores[batch]) - scores[batch])) > 1e-6
  probs = np.asarray(method.probs(state), np.float64)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(metrics["sampler/pool_ess"]), 1.0 / np.sum(probs**2), rtol=1e-4)
  # The kept distribution is that of the rows' new scores, not of the scores at the last probe.
  np.testing.assert_allclose(probs, dvn.sampling_probs(state.scores), rtol=1e-6, atol=1e-9)
  assert np.max(np.abs(probs - np.asarray(dvn.sampling_probs(jnp.asarray(scores))))) > 1e-9


def test_dvn_kept_distribution_follows_the_scores_between_probes(sine):
  method = dvn.dvn(SAMPLER_MODEL, persample.squared_error, period=3, num_samples=8, temperature=0.5)
  records = []
  result = train.fit(SAMPLER_MODEL, sine, dataclasses.replace(CONFIG, epochs=1), method, log=records.append)
  state = result.state.method_state
  assert int(state.step) % 3 != 0  # the last step did not probe: only its own rows were rescored
  want = np.asarray(dvn.sampling_probs(state.scores, "softmax", 0.5), np.float64)
  np.testing.assert_allclose(_pool_probs(method, result), want, rtol=1e-6, atol=1e-9)
  last = [r for r in records if "epoch" not in r][-1]
  np.testing.assert_allclose(last["step/sampler/pool_ess"], 1.0 / np.sum(want**2), rtol=1e-4)
  np.testing.assert_allclose(last["step/sampler/max_prob"], want.max(), rtol=1e-5)


def test_table_sampler_normalises_once_per_step_and_scores_the_pool_only_when_due(sine):
  """Each step scores its own rows and normalises the scores once (the loop draws from the kept
  distribution); the whole pool is scored only on the steps it is measured or the learner learns."""
  num_train = len(sine.train)
  calls = {"normalise": 0, "pool": 0, "rows": 0}

  def counted(name):
    jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))

  def score(learner, table):
    counted("pool" if table.shape[0] == num_train else "rows")
    return table[:, 0]

  def distribution(learner, scores):
    counted("normalise")
    return dvn.sampling_probs(scores, "none")

  features = dvn.proxy_features(SAMPLER_MODEL, persample.squared_error, include=("grad_norm",))
  method = dvn.table_sampler(
      features, score, distribution, learner_init=lambda key, n: jnp.zeros((), jnp.int32),
      learn=lambda learner, table, ctx: learner + 1, learn_every=3, refresh_every=5,
  )
  config = dataclasses.replace(CONFIG, epochs=1)
  result = train.fit(SAMPLER_MODEL, sine, config, method)
  jax.effects_barrier()
  steps = num_train // config.batch_size  # 8: the pool is measured at 0 and 5, the learner learns at 0, 3 and 6
  assert calls == {"normalise": 1 + steps, "pool": 4, "rows": steps}  # one normalisation at init
  assert int(result.state.method_state.learner) == 3
  np.testing.assert_allclose(
      _pool_probs(method, result), dvn.sampling_probs(result.state.method_state.scores, "none"), rtol=1e-6
  )


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(period=0), "period must be an integer >= 1"),
        (dict(num_samples=0), "num_samples must be an integer >= 1"),
        (dict(num_samples=8, memory=4), "memory=4 cannot hold"),
        (dict(fit_steps=0), "fit_steps must be an integer >= 1"),
        (dict(refresh_every=0), "refresh_every must be an integer >= 1"),
        (dict(step_size=0.0), "step_size must be a positive finite number"),
        (dict(step_size=-1e-3), "step_size must be a positive finite number"),
        (dict(temperature=0.0), "temperature must be a positive finite number"),
        (dict(learning_rate=-1.0), "learning_rate must be a positive finite number"),
        (dict(temperature=float("inf")), "temperature must be a positive finite number"),
        (dict(target="second_order"), r"unknown target 'second_order'; expected one of \('exact', 'first_order'\)"),
        (dict(normalization="sparsemax"), r"unknown normalization 'sparsemax'; expected one of \('softmax', 'none'\)"),
    ],
)
def test_dvn_rejects_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    dvn.dvn(SAMPLER_MODEL, persample.squared_error, **options)


def test_grad_norm_sampler_rejects_bad_refresh():
  with pytest.raises(ValueError, match="refresh_every must be an integer >= 1"):
    dvn.grad_norm_sampler(SAMPLER_MODEL, persample.squared_error, refresh_every=-2)


def test_num_samples_larger_than_pool_is_rejected(sine):
  method = dvn.dvn(SAMPLER_MODEL, persample.squared_error, num_samples=8)
  with pytest.raises(ValueError, match="num_samples=8 is larger than the training pool"):
    method.init(jax.random.key(0), 4)
  method = dvn.dvn(SAMPLER_MODEL, persample.squared_error, num_samples=len(sine.train) + 1)
  with pytest.raises(ValueError, match="larger than the training pool"):
    train.fit(SAMPLER_MODEL, sine, CONFIG, method)


def test_sampler_needs_the_training_pool(sine):
  method = dvn.grad_norm_sampler(SAMPLER_MODEL, persample.squared_error)
  params = models.init(SAMPLER_MODEL, jax.random.key(0), (1,))
  ctx = _step_context(params, sine, range(4), jax.random.key(1))._replace(pool=None)
  with pytest.raises(ValueError, match="whole training pool"):
    method.weights(method.init(jax.random.key(0), len(sine.train)), ctx)
