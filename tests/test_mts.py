"""Hypergradients against closed forms and finite differences; unrolls against hand unrolls; methods under jit."""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import blobs, check_method
from jax.test_util import check_grads

from metasel import core, data, models, mts, persample, signals, train

LR = 0.3
B, D, C = 12, 5, 3


def _mlp_problem(seed=0):
  """A small MLP classifier, a training batch, a validation batch and per-sample features."""
  model = models.MLP(hidden=(8,), num_outputs=C, activation=jnp.tanh)
  keys = jax.random.split(jax.random.key(seed), 6)
  params = models.init(model, keys[0], (D,))
  x, vx = jax.random.normal(keys[1], (B, D)), jax.random.normal(keys[2], (7, D))
  y, vy = jax.random.randint(keys[3], (B,), 0, C), jax.random.randint(keys[4], (7,), 0, C)
  per_sample = lambda p, xb, yb: persample.losses(model, p, xb, yb, persample.softmax_cross_entropy)
  outer = lambda p: jnp.mean(per_sample(p, vx, vy))
  feats = jax.random.normal(keys[5], (B, 2))
  return model, params, (x, y), outer, per_sample, feats


def _ridge_problem(lam=0.1, seed=1):
  """Ridge regression: l_i = (x_i.w + b - y_i)^2 / 2 + lam ||w||^2 / 2, validation mean squared error."""
  rng = np.random.default_rng(seed)
  x, vx = rng.normal(size=(B, D)).astype(np.float32), rng.normal(size=(9, D)).astype(np.float32)
  w_true = rng.normal(size=D).astype(np.float32)
  y = (x @ w_true + rng.normal(size=B)).astype(np.float32)
  vy = (vx @ w_true).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def per_sample(p, xb, yb):
    return 0.5 * jnp.square(xb @ p["w"] + p["b"] - yb) + 0.5 * lam * jnp.sum(jnp.square(p["w"]))

  outer = lambda p: 0.5 * jnp.mean(jnp.square(vx @ p["w"] + p["b"] - vy))
  feats = jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)
  return params, (jnp.asarray(x), jnp.asarray(y)), outer, per_sample, feats


def _meta_net():
  net = mts.MetaNet(hidden=(6,))
  return net, net.init(jax.random.key(3), jnp.zeros((1, 2)))["params"]


def _weigh(net, feats, k=1):
  return lambda phi: jnp.broadcast_to(mts.normalize(net.apply({"params": phi}, feats)), (k, feats.shape[0]))


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)] + [np.zeros(0)]).astype(np.float64)


def _per_sample_grads(per_sample, params, x, y) -> np.ndarray:
  """(B, P) per-sample gradients, one sample at a time."""
  rows = [_flat(jax.grad(lambda p: per_sample(p, x[i : i + 1], y[i : i + 1])[0])(params)) for i in range(x.shape[0])]
  return np.stack(rows)


def _closed_form(weigh, phi, outer, per_sample, params, batch, lr):
  """-lr <grad L_val(theta'), grad l_i(theta)> for each i, chained through the weights' Jacobian."""
  x, y = batch
  w = weigh(phi)[0]
  step = jax.grad(lambda p: jnp.sum(w * per_sample(p, x, y)))(params)
  after = jax.tree.map(lambda p, g: p - lr * g, params, step)
  sensitivity = -lr * _per_sample_grads(per_sample, params, x, y) @ _flat(jax.grad(outer)(after))
  _, vjp = jax.vjp(lambda f: weigh(f)[0], phi)
  return _flat(vjp(jnp.asarray(sensitivity, jnp.float32))[0]), sensitivity


def _problems():
  model, params, batch, outer, per_sample, feats = _mlp_problem()
  r_params, r_batch, r_outer, r_per_sample, r_feats = _ridge_problem()
  return {"mlp": (params, batch, outer, per_sample, feats), "ridge": (r_params, r_batch, r_outer, r_per_sample, r_feats)}


PROBLEMS = _problems()


@pytest.mark.parametrize("problem", ["mlp", "ridge"])
@pytest.mark.parametrize("mode", ["exact", "first_order"])
def test_one_step_hypergrad_equals_closed_form(problem, mode):
  params, batch, outer, per_sample, feats = PROBLEMS[problem]
  net, phi = _meta_net()
  weigh = _weigh(net, feats)
  expected, _ = _closed_form(weigh, phi, outer, per_sample, params, batch, LR)
  state = optax.sgd(LR).init(params)
  batches = jax.tree.map(lambda a: a[None], batch)
  hg = jax.jit(functools.partial(mts.hypergrad, mode=mode), static_argnums=(0, 2, 3, 4))(
      weigh, phi, outer, per_sample, optax.sgd, params, state, batches, LR
  )
  np.testing.assert_allclose(_flat(hg.grads), expected, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("problem", ["mlp", "ridge"])
def test_finite_difference_hypergrad_approaches_closed_form(problem):
  params, batch, outer, per_sample, feats = PROBLEMS[problem]
  net, phi = _meta_net()
  weigh = _weigh(net, feats)
  expected, _ = _closed_form(weigh, phi, outer, per_sample, params, batch, LR)
  batches = jax.tree.map(lambda a: a[None], batch)
  hg = mts.hypergrad(
      weigh, phi, outer, per_sample, optax.sgd, params, optax.sgd(LR).init(params), batches, LR, mode="finite_difference", fd_epsilon=1e-2
  )
  np.testing.assert_allclose(_flat(hg.grads), expected, rtol=0.05, atol=0.02 * np.abs(expected).max())


@pytest.mark.parametrize("problem", ["mlp", "ridge"])
@pytest.mark.parametrize(
    "inner", [optax.sgd, lambda lr: optax.sgd(lr, momentum=0.9), lambda lr: optax.adam(lr, eps_root=1e-16)],
    ids=["sgd", "momentum", "adam"],
)
def test_k_step_hypergrad_matches_finite_differences(problem, inner):
  params, batch, outer, per_sample, feats = PROBLEMS[problem]
  net, phi = _meta_net()
  k = 3
  batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), batch)
  lr = 0.05

  def objective(phi, params=params, batches=batches, feats=feats):
    new_params, _ = mts.unroll(per_sample, inner, params, inner(lr).init(params), _weigh(net, feats, k)(phi), batches, lr)
    return outer(new_params)

  # Finite differences in float64, so that they are accurate enough to check against.
  jax.config.update("jax_enable_x64", True)
  try:
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    objective64 = functools.partial(objective, params=as64(params), batches=as64(batches), feats=as64(feats))
    check_grads(objective64, (as64(phi),), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
  finally:
    jax.config.update("jax_enable_x64", False)
  plain = mts.hypergrad(_weigh(net, feats, k), phi, outer, per_sample, inner, params, inner(lr).init(params), batches, lr)
  remat = mts.hypergrad(
      _weigh(net, feats, k), phi, outer, per_sample, inner, params, inner(lr).init(params), batches, lr, remat=True
  )
  np.testing.assert_allclose(_flat(plain.grads), _flat(remat.grads), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(_flat(plain.grads), _flat(jax.grad(objective)(phi)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "inner", [optax.sgd, lambda lr: optax.sgd(lr, momentum=0.9), optax.adam], ids=["sgd", "momentum", "adam"]
)
def test_k_step_unroll_equals_hand_unroll(inner):
  params, (x, y), _, per_sample, _ = PROBLEMS["mlp"]
  k = 4
  xs = jnp.stack([jnp.roll(x, i, axis=0) for i in range(k)])
  ys = jnp.stack([jnp.roll(y, i) for i in range(k)])
  weights = jax.nn.softmax(jax.random.normal(jax.random.key(5), (k, B)), axis=-1)
  tx = inner(0.1)
  got_params, got_state = jax.jit(mts.unroll, static_argnums=(0, 1))(
      per_sample, inner, params, tx.init(params), weights, (xs, ys), 0.1
  )
  hand_params, hand_state = params, tx.init(params)
  for t in range(k):
    grads = jax.grad(lambda p: jnp.sum(weights[t] * per_sample(p, xs[t], ys[t])))(hand_params)
    updates, hand_state = tx.update(grads, hand_state, hand_params)
    hand_params = optax.apply_updates(hand_params, updates)
  np.testing.assert_allclose(_flat(got_params), _flat(hand_params), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(got_state), _flat(hand_state), rtol=1e-5, atol=1e-6)


def test_first_order_differs_from_exact_beyond_one_step():
  params, batch, outer, per_sample, feats = PROBLEMS["mlp"]
  net, phi = _meta_net()
  batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (3, *a.shape)), batch)
  grads = {
      mode: _flat(mts.hypergrad(_weigh(net, feats, 3), phi, outer, per_sample, optax.sgd, params, optax.sgd(LR).init(params), batches, 0.5, mode=mode).grads)
      for mode in ("exact", "first_order")
  }
  assert not np.allclose(grads["exact"], grads["first_order"], rtol=1e-3)
  cos = grads["exact"] @ grads["first_order"] / np.linalg.norm(grads["exact"]) / np.linalg.norm(grads["first_order"])
  assert cos > 0.5  # an approximation, not noise


def test_inner_learning_rate_is_traced():
  params, batch, outer, per_sample, feats = PROBLEMS["ridge"]
  net, phi = _meta_net()
  batches = jax.tree.map(lambda a: a[None], batch)
  fn = jax.jit(lambda lr: mts.hypergrad(_weigh(net, feats), phi, outer, per_sample, optax.sgd, params, optax.sgd(LR).init(params), batches, lr).grads)
  for lr in (0.1, 0.2):
    expected, _ = _closed_form(_weigh(net, feats), phi, outer, per_sample, params, batch, lr)
    np.testing.assert_allclose(_flat(fn(lr)), expected, rtol=2e-4, atol=1e-7)
  assert fn._cache_size() == 1


# ----------------------------------------------------------------------------------------------------
# Normalisations


def test_normalizations():
  raw = jnp.array([0.5, -1.0, 2.0, 0.0])
  np.testing.assert_allclose(mts.normalize(jnp.abs(raw), "sum"), np.abs(raw) / np.abs(raw).sum(), rtol=1e-6)
  np.testing.assert_allclose(mts.normalize(raw, "softmax"), jax.nn.softmax(raw), rtol=1e-6)
  np.testing.assert_allclose(mts.normalize(raw, "clamp"), [0.2, 0.0, 0.8, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(mts.normalize(-jnp.ones(3), "clamp"), np.zeros(3))
  with pytest.raises(ValueError, match="unknown normalization 'max'"):
    mts.normalize(raw, "max")


@pytest.mark.parametrize("seed", range(5))
def test_l2rw_weights_are_non_negative_and_sum_to_one(seed):
  model, params, (x, y), _, _, _ = _mlp_problem(seed)
  keys = jax.random.split(jax.random.key(seed + 10), 2)
  vx, vy = jax.random.normal(keys[0], (16, D)), jax.random.randint(keys[1], (16,), 0, C)
  ctx = core.StepContext(params, core.Batch(jnp.arange(B), x, y), vx, vy, keys[0])
  method = mts.l2rw(model, persample.softmax_cross_entropy)
  w, _, metrics = jax.jit(method.weights)(method.init(keys[0], B), ctx)
  assert np.all(np.asarray(w) >= 0)
  np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-5)
  # L2RW keeps the samples whose gradient agrees with the validation gradient.
  val_grad = jax.grad(lambda p: jnp.mean(persample.losses(model, p, vx, vy, persample.softmax_cross_entropy)))(params)
  dots = persample.grad_dots(model, params, x, y, val_grad, persample.softmax_cross_entropy, method="vmap")
  np.testing.assert_array_equal(np.asarray(w) > 0, np.asarray(dots) > 0)
  np.testing.assert_allclose(w, np.maximum(dots, 0) / np.maximum(dots, 0).sum(), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# Features, meta-inputs and the meta-step


def test_features_name_their_columns_and_meta_inputs_follow_them():
  model, params, (x, y), _, _, _ = _mlp_problem()
  table = np.arange(3 * B, dtype=np.float32).reshape(B, 3)
  feats = mts.concat_features(mts.loss_features(model, persample.softmax_cross_entropy), mts.table_features(table, ("a", "b", "c")))
  assert feats.names == ("loss", "a", "b", "c") and feats.width == 4
  assert mts.table_features(table).names == ("table_0", "table_1", "table_2")
  assert mts.position_features(model, persample.softmax_cross_entropy, C).width == 5
  ctx = core.StepContext(params, core.Batch(jnp.arange(B)[::-1], x, y, jnp.arange(B) % 2), x[:7], y[:7], jax.random.key(0))
  raw = np.asarray(feats(ctx))
  np.testing.assert_allclose(raw[:, 1:], table[::-1], rtol=1e-6)  # the batch's rows of the table
  np.testing.assert_allclose(raw[:, 0], persample.losses(model, params, x, y, persample.softmax_cross_entropy), rtol=1e-5)
  plain, labels, groups = mts.meta_inputs(feats, mts.MetaNet(), ctx, standardize=False)
  np.testing.assert_allclose(plain, raw, rtol=1e-6)
  assert labels is None and groups is None
  scored, labels, groups = mts.meta_inputs(feats, mts.MetaNet(num_classes=C, num_groups=2), ctx)
  np.testing.assert_allclose(scored, mts.zscore(jnp.asarray(raw)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, y)
  np.testing.assert_array_equal(groups, jnp.arange(B) % 2)
  # A meta-network initialised for the width takes the inputs.
  net = mts.MetaNet(hidden=(6,), num_classes=C, num_groups=2)
  meta_params = mts.init_meta_net(net, jax.random.key(1), feats.width)
  assert meta_params["Dense_0"]["kernel"].shape == (4 + 4 + 1, 6)  # features, class and group embeddings
  weights = mts.meta_weights(net, meta_params, (scored, labels, groups))
  assert weights.shape == (B,) and np.all(np.asarray(weights) > 0)
  np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, rtol=1e-5)


def test_meta_step_takes_finite_steps_and_skips_the_others():
  net = mts.MetaNet(hidden=(3,))
  meta_params = mts.init_meta_net(net, jax.random.key(0), 2)
  flat_params, _ = jax.flatten_util.ravel_pytree(meta_params)
  sgd = optax.sgd(0.5)
  state = mts.MetaState(meta_params, sgd.init(flat_params), jnp.zeros((), jnp.int32), jnp.asarray(0.1))
  grads = jax.tree.map(jnp.ones_like, meta_params)
  stepped, metrics = jax.jit(lambda s, g: mts.meta_step(sgd, s, g))(state, grads)
  for a, b in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(meta_params)):
    np.testing.assert_allclose(a, b - 0.5, rtol=1e-6, atol=1e-6)
  assert int(stepped.skipped) == 0 and int(metrics["meta/skipped"]) == 0
  np.testing.assert_allclose(float(metrics["meta/grad_norm"]), np.sqrt(flat_params.size), rtol=1e-6)
  poisoned = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), grads)
  skipped, metrics = jax.jit(lambda s, g: mts.meta_step(sgd, s, g))(state, poisoned)
  for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(meta_params)):
    np.testing.assert_array_equal(a, b)
  assert int(skipped.skipped) == 1 and int(metrics["meta/skipped"]) == 1
  assert float(skipped.inner_learning_rate) == pytest.approx(0.1)


def test_mts_inner_learning_rate_is_traced_state():
  model, params, (x, y), _, _, _ = _mlp_problem()
  loss, net = persample.softmax_cross_entropy, mts.MetaNet(hidden=(6,))
  feats = mts.loss_features(model, loss)
  method = mts.mts(model, loss, feats, meta_net=net, inner_learning_rate=0.2)
  state = method.init(jax.random.key(0), B)
  assert state.inner_learning_rate.dtype == jnp.float32 and float(state.inner_learning_rate) == pytest.approx(0.2)
  ctx = core.StepContext(params, core.Batch(jnp.arange(B), x, y), x[:7], y[:7], jax.random.key(0))
  weights = jax.jit(method.weights)
  val_losses = [float(weights(state._replace(inner_learning_rate=jnp.asarray(lr, jnp.float32)), ctx)[2]["meta/val_loss"]) for lr in (0.2, 2.0)]
  assert weights._cache_size() == 1
  # The validation loss after the virtual step is that of the meta-weighted SGD step at the state's rate.
  w = mts.meta_weights(net, state.params, mts.meta_inputs(feats, net, ctx))
  grad = jax.grad(lambda p: jnp.sum(w * persample.losses(model, p, x, y, loss)))(params)
  for lr, val_loss in zip((0.2, 2.0), val_losses):
    stepped = jax.tree.map(lambda p, g, lr=lr: p - lr * g, params, grad)
    expected = float(jnp.mean(persample.losses(model, stepped, x[:7], y[:7], loss)))
    assert val_loss == pytest.approx(expected, rel=1e-4)
  assert val_losses[0] != pytest.approx(val_losses[1], rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# Methods in the training loop


def _blobs(n=96, seed=0):
  return blobs(n, seed, classes=C, dim=D)


MODEL = models.MLP(hidden=(16,), num_outputs=C)
LOSS = persample.softmax_cross_entropy


def _methods():
  table = np.random.default_rng(0).normal(size=(96, 3)).astype(np.float32)
  feats = mts.concat_features(mts.loss_features(MODEL, LOSS), mts.table_features(table))
  embed = mts.MetaNet(hidden=(8,), num_classes=C, num_groups=2)
  return {
      "uniform": mts.uniform(),
      "l2rw": mts.l2rw(MODEL, LOSS),
      "mwn": mts.mwn(MODEL, LOSS),
      "mts": mts.mts(MODEL, LOSS, feats),
      "mts-online": mts.mts(MODEL, LOSS, feats, lookahead=False),
      "mts-position": mts.mts(MODEL, LOSS, mts.position_features(MODEL, LOSS, C), meta_net=embed),
      "mts-softmax-k2-remat-adam": mts.mts(
          MODEL, LOSS, feats, steps=2, remat=True, normalization="softmax",
          inner_optimizer=lambda lr: optax.adam(lr, eps_root=1e-16), inner_learning_rate=0.01,
      ),
      "mts-first-order": mts.mts(MODEL, LOSS, feats, steps=2, mode="first_order"),
      "mts-finite-difference": mts.mts(MODEL, LOSS, feats, mode="finite_difference", meta_net=mts.MetaNet(output="softplus")),
  }


METHODS = _methods()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_conforms_under_jit(name):
  checked = check_method(METHODS[name], MODEL, LOSS, _blobs(), groups=jnp.arange(96) % 2)
  if "meta/skipped" in checked.step_metrics:
    initial, second = checked.initial.method_state, checked.second.method_state
    assert int(second.skipped) == 0
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(second.params)))


def test_online_sensitivity_is_the_closed_form_of_the_loop_step():
  """The loop's weight VJP gives -lr <grad L_val(theta'), grad l_i(theta)> for its own SGD step."""
  dataset = _blobs()
  lr = 0.2
  tx = optax.sgd(lr)
  recorded = {}

  def update(state, ctx, result, carry):
    val_grad = jax.grad(lambda p: jnp.mean(LOSS(MODEL.apply({"params": p}, ctx.val_x), ctx.val_y)))(result.params)
    recorded.update(ctx=ctx, params=result.params)
    return result.weight_vjp(val_grad), {}

  probe = core.Method(
      init=lambda key, n: jnp.zeros(16),
      weights=lambda state, ctx: (jnp.full(16, 1 / 16), (), {}),
      update=update,
  )
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  data = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  state = train.LoopState(params, tx.init(params), jnp.zeros(16), signals.tracker_init(96), jnp.zeros((), jnp.int32), jax.random.key(2))
  with jax.disable_jit():
    final, _ = train.make_epoch(train.make_step(MODEL, LOSS, tx, probe, num_train=96, track_dynamics=True), 16)(state, data, jnp.arange(16)[None])
  ctx = recorded["ctx"]
  val_grad = jax.grad(lambda p: jnp.mean(LOSS(MODEL.apply({"params": p}, ctx.val_x), ctx.val_y)))(recorded["params"])
  per_sample = lambda p, x, y: LOSS(MODEL.apply({"params": p}, x), y)
  expected = -lr * _per_sample_grads(per_sample, params, ctx.batch.x, ctx.batch.y) @ _flat(val_grad)
  np.testing.assert_allclose(final.method_state, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "online"])
def test_mts_learns_to_down_weight_label_noise(lookahead):
  """Blobs with half the train labels flipped: MTS on the loss learns low weights for flipped samples."""
  from metasel import stats

  dataset = _blobs(n=192, seed=1)
  flipped = np.random.default_rng(0).random(192) < 0.5
  y = np.where(flipped, (dataset.train.y + 1) % C, dataset.train.y).astype(np.int32)
  noisy = data.from_arrays(
      (dataset.train.x, y, flipped.astype(np.int32)), dataset.val, dataset.test, num_classes=C,
      tier_names=("clean", "flipped"),
  )
  config = train.TrainConfig(epochs=10, batch_size=32, val_batch_size=32, learning_rate=1e-2)
  method = mts.mts(MODEL, LOSS, mts.loss_features(MODEL, LOSS), lookahead=lookahead)
  result = train.fit(MODEL, noisy, config, method)
  losses = persample.losses(MODEL, result.state.params, noisy.train.x, noisy.train.y, LOSS)
  scores = mts.MetaNet().apply({"params": result.state.method_state.params}, mts.zscore(losses[:, None]))
  assert stats.auc(-np.asarray(scores), flipped) > 0.7
  plain = train.fit(MODEL, noisy, config)
  # Half the labels flipped to the next class leaves plain training at a tie in every class region, so
  # its test accuracy swings from epoch to epoch (0.59 to 0.81 over the last five here): compare the
  # mean of the last five epochs, not one epoch's draw.
  last_five = lambda history: np.mean([record["test/accuracy"] for record in history[-5:]])
  assert last_five(result.history) > last_five(plain.history) + 0.1


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_clearly():
  feats = mts.loss_features(MODEL, LOSS)
  with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
    mts.mts(MODEL, LOSS, feats, steps=0)
  with pytest.raises(ValueError, match=r"unknown mode 'second_order'; expected one of \('exact', 'first_order', 'finite_difference'\)"):
    mts.mts(MODEL, LOSS, feats, mode="second_order")
  with pytest.raises(ValueError, match="finite_difference hypergradients take one inner step"):
    mts.mts(MODEL, LOSS, feats, steps=2, mode="finite_difference")
  with pytest.raises(ValueError, match="without lookahead"):
    mts.mts(MODEL, LOSS, feats, steps=2, lookahead=False)
  with pytest.raises(ValueError, match="inner_learning_rate must be a positive finite number, got 0.0"):
    mts.mts(MODEL, LOSS, feats, inner_learning_rate=0.0)
  with pytest.raises(ValueError, match=r"feature table: 1 NaN or inf values \(first: row 2, table_1\); expected finite values"):
    mts.table_features(np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 1.0))
  with pytest.raises(ValueError, match=r"feature table: 1 NaN or inf values \(first: row 2, b\)"):
    mts.table_features(np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 1.0), names=("a", "b", "c"))
  with pytest.raises(ValueError, match="got 2 names for a feature table of 3 columns"):
    mts.table_features(np.ones((4, 3)), names=("a", "b"))
  with pytest.raises(ValueError, match="features must be a metasel.mts.Features"):
    mts.mts(MODEL, LOSS, feats.fn)
  dataset = _blobs()
  # Features that name 3 columns but compute 1: the meta-network is built for 3 and the step refuses the batch.
  wrong_width = mts.mts(MODEL, LOSS, mts.Features(("a", "b", "c"), feats.fn))
  with pytest.raises(ValueError, match=r"features \('a', 'b', 'c'\) returned shape \(16, 1\); expected \(batch, 3\)"):
    train.fit(MODEL, dataset, train.TrainConfig(epochs=1, batch_size=16, val_batch_size=16), wrong_width)
  with pytest.raises(ValueError, match="batch_size=500 is larger than the training split"):
    train.fit(MODEL, dataset, train.TrainConfig(epochs=1, batch_size=500), mts.mwn(MODEL, LOSS))
  embeds_groups = mts.mts(MODEL, LOSS, feats, meta_net=mts.MetaNet(num_groups=2))
  tx = optax.sgd(0.1)
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  state = train.LoopState(
      params, tx.init(params), embeds_groups.init(jax.random.key(1), 96), signals.tracker_init(96),
      jnp.zeros((), jnp.int32), jax.random.key(2),
  )
  no_groups = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  with pytest.raises(ValueError, match="embeds real/synthetic groups .* but the batch has none"):
    train.make_epoch(train.make_step(MODEL, LOSS, tx, embeds_groups, num_train=96, track_dynamics=True), 16)(state, no_groups, jnp.arange(16)[None])


def test_inner_learning_rate_is_checked_like_every_positive_setting():
  feats = mts.loss_features(MODEL, LOSS)
  mts.mts(MODEL, LOSS, feats, inner_learning_rate=np.float32(0.1))  # a numpy float is a valid rate
  with pytest.raises(ValueError, match="inner_learning_rate must be a positive finite number, got inf"):
    mts.mts(MODEL, LOSS, feats, inner_learning_rate=float("inf"))


def test_non_finite_meta_gradient_is_skipped_and_counted():
  method = mts.mts(MODEL, LOSS, mts.loss_features(MODEL, LOSS), lookahead=False)
  dataset = _blobs()
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  x, y = jnp.asarray(dataset.train.x[:16]), jnp.asarray(dataset.train.y[:16])
  ctx = core.StepContext(params, core.Batch(jnp.arange(16), x, y), jnp.asarray(dataset.val.x[:16]), jnp.asarray(dataset.val.y[:16]), jax.random.key(0))
  state = method.init(jax.random.key(1), 96)
  _, carry, _ = method.weights(state, ctx)
  poisoned = core.StepResult(jnp.zeros(16), params, lambda cotangent: jnp.full(16, jnp.nan))
  new_state, metrics = jax.jit(lambda state, ctx, carry: method.update(state, ctx, poisoned, carry))(state, ctx, carry)
  assert int(new_state.skipped) == 1 and int(metrics["meta/skipped"]) == 1
  for a, b in zip(jax.tree.leaves(new_state._replace(skipped=state.skipped)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # The same step with a finite sensitivity is taken: the meta-network moves and nothing is counted.
  finite = core.StepResult(jnp.zeros(16), params, lambda cotangent: jnp.linspace(-1.0, 1.0, 16))
  stepped, metrics = jax.jit(lambda state, ctx, carry: method.update(state, ctx, finite, carry))(state, ctx, carry)
  assert int(stepped.skipped) == 0 and int(metrics["meta/skipped"]) == 0
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(state.params)))
