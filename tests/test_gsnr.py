"""GSNR against a numpy reference, the closed form of linear regression, and its growth with batch size."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasel import gsnr, persample, records
from metasel.models import MLP, init

DIM = 4
RESIDUAL = np.array([1.0, -0.5, 0.8, 1.2], np.float32)  # r = w - w*
NOISE_STD = 0.5  # s


def _linear_grad(w, batch):
  """Gradient at w of the batch mean of 0.5 (x.w - y)^2, for a batch (x (b, d), y (b,))."""
  x, y = batch
  return jax.grad(lambda v: 0.5 * jnp.mean(jnp.square(x @ v - y)))(w)


def _linear_data(key, shape):
  """Inputs x ~ N(0, I_d) of shape (*shape, d), targets y = x.w* + eps, and w = w* + r."""
  kw, kx, ke = jax.random.split(key, 3)
  w_star = jax.random.normal(kw, (DIM,))
  x = jax.random.normal(kx, (*shape, DIM))
  y = x @ w_star + NOISE_STD * jax.random.normal(ke, shape)
  return (x, y), w_star + RESIDUAL


def _closed_form(batch_size):
  """Per-entry GSNR b r_j^2 / (||r||^2 + r_j^2 + s^2), aggregate b||r||^2 / ((d + 1)||r||^2 + d s^2)."""
  r = RESIDUAL.astype(np.float64)
  sq = np.sum(r**2)
  per_entry = batch_size * r**2 / (sq + r**2 + NOISE_STD**2)
  aggregate = batch_size * sq / (DIM * sq + sq + DIM * NOISE_STD**2)
  return per_entry, aggregate


def test_summarize_matches_numpy_reference():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(7, 3, 2)).astype(np.float32), "b": rng.normal(size=(7, 5)).astype(np.float32)}
  tree["a"][:, 0, 0] = 2.0  # zero variance, nonzero mean
  tree["b"][:, 1] = 0.0  # zero variance, zero mean
  got = gsnr.summarize(tree)

  leaves = [np.asarray(tree[k], np.float64).reshape(7, -1) for k in ("a", "b")]
  stacked = np.concatenate(leaves, axis=1)  # (M, P)
  mean, var = stacked.mean(0), stacked.var(0, ddof=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(var > 0, mean**2 / var, np.nan)
  got_flat = np.concatenate([np.asarray(got.per_param[k]).reshape(-1) for k in ("a", "b")])
  np.testing.assert_allclose(got_flat, ratio, rtol=1e-4)
  assert np.isnan(got.per_param["a"][0, 0]) and np.isnan(got.per_param["b"][1])
  np.testing.assert_allclose(got.mean, np.nanmean(ratio), rtol=1e-4)
  np.testing.assert_allclose(got.median, np.nanmedian(ratio), rtol=1e-4)
  np.testing.assert_allclose(got.signal, np.sum(mean**2), rtol=1e-4)
  np.testing.assert_allclose(got.noise, np.sum(var), rtol=1e-4)
  np.testing.assert_allclose(got.aggregate, np.sum(mean**2) / np.sum(var), rtol=1e-4)
  assert got.num_batches == 7

  jitted = jax.jit(gsnr.summarize)(tree)
  np.testing.assert_allclose(jitted.aggregate, got.aggregate, rtol=1e-5)
  np.testing.assert_allclose(jitted.median, got.median, rtol=1e-5)

  with pytest.raises(ValueError, match="at least 2 gradients.*got 1"):
    gsnr.summarize({"a": np.ones((1, 3))})
  with pytest.raises(ValueError, match="disagree on the leading axis"):
    gsnr.summarize({"a": np.ones((3, 2)), "b": np.ones((4,))})


def test_measure_matches_linear_regression_closed_form():
  batch_size, num = 32, 4000
  batches, w = _linear_data(jax.random.key(1), (num, batch_size))
  got = jax.jit(gsnr.measure, static_argnums=0)(_linear_grad, w, batches)
  per_entry, aggregate = _closed_form(batch_size)
  np.testing.assert_allclose(got.per_param, per_entry, rtol=0.1)
  np.testing.assert_allclose(got.aggregate, aggregate, rtol=0.05)
  np.testing.assert_allclose(got.mean, per_entry.mean(), rtol=0.05)
  assert got.num_batches == num


def test_gsnr_grows_with_batch_size_and_per_sample_estimator():
  pool, num = 4096, 2000
  data, w = _linear_data(jax.random.key(2), (pool,))
  results = gsnr.sweep(_linear_grad, w, data, (4, 16, 64), num_batches=num, key=jax.random.key(3))
  assert sorted(results) == [4, 16, 64] and results[4].num_batches == num
  np.testing.assert_allclose(results[16].aggregate / results[4].aggregate, 4.0, rtol=0.15)
  np.testing.assert_allclose(results[64].aggregate / results[4].aggregate, 16.0, rtol=0.15)
  np.testing.assert_allclose(results[16].aggregate, _closed_form(16)[1], rtol=0.15)

  @jax.jit
  def estimates(w, x, y, rows):
    per_sample = jax.vmap(lambda xi, yi: _linear_grad(w, (xi[None], yi[None])))(x, y)  # (n, d)
    drawn = gsnr.measure(_linear_grad, w, (x[rows], y[rows]))
    return gsnr.summarize(per_sample), gsnr.from_per_sample(per_sample, 16), drawn

  rows = jax.random.randint(jax.random.key(4), (num, 16), 0, pool)  # with replacement
  base, at_16, drawn = estimates(w, *data, rows)
  np.testing.assert_allclose(at_16.per_param, 16 * base.per_param, rtol=1e-6)
  np.testing.assert_allclose(at_16.aggregate, 16 * base.aggregate, rtol=1e-6)
  np.testing.assert_allclose(at_16.median, 16 * base.median, rtol=1e-6)
  np.testing.assert_allclose(at_16.noise, base.noise / 16, rtol=1e-6)
  np.testing.assert_allclose(at_16.signal, base.signal, rtol=1e-6)

  np.testing.assert_allclose(drawn.aggregate, at_16.aggregate, rtol=0.1)
  np.testing.assert_allclose(drawn.per_param, at_16.per_param, rtol=0.2)


def _mlp_setup():
  model = MLP(hidden=(16,), num_outputs=3)
  kp, kx, ky = jax.random.split(jax.random.key(5), 3)
  params = init(model, kp, (5,))
  data = (jax.random.normal(kx, (256, 5)), jax.random.randint(ky, (256,), 0, 3))
  traces = []

  def grad_fn(p, batch):
    traces.append(1)
    x, y = batch
    return jax.grad(lambda q: jnp.mean(persample.losses(model, q, x, y, persample.softmax_cross_entropy)))(p)

  return params, data, grad_fn, traces


def test_sweep_compiles_once_per_batch_size_and_matches_measure():
  params, data, grad_fn, traces = _mlp_setup()
  key = jax.random.key(6)
  results = gsnr.sweep(grad_fn, params, data, (8, 32), num_batches=12, key=key)
  assert len(traces) == 2
  again = gsnr.sweep(grad_fn, params, data, (8, 32), num_batches=12, key=key)
  assert len(traces) == 2
  np.testing.assert_array_equal(again[8].aggregate, results[8].aggregate)

  keys = jax.random.split(jax.random.fold_in(key, 8), 12)
  batches = jax.vmap(lambda k: gsnr.draw_rows(k, data, 8))(keys)  # ((12, 8, 5), (12, 8))
  references = jax.jit(
      lambda p, bt: (gsnr.measure(grad_fn, p, bt), gsnr.measure(grad_fn, p, bt, chunk_size=5))
  )
  got = results[8]
  assert jax.tree.structure(got.per_param) == jax.tree.structure(params)
  for ref in references(params, batches):
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, got.per_param, ref.per_param)
    np.testing.assert_allclose(got.aggregate, ref.aggregate, rtol=1e-4)
    np.testing.assert_allclose(got.median, ref.median, rtol=1e-4)
  for got in results.values():
    summary = gsnr.as_dict(got)
    assert summary["num_batches"] == 12 and all(np.isfinite(v) for v in summary.values())
    assert isinstance(summary["aggregate"], float)


def test_draw_rows_draws_distinct_rows_shared_across_leaves():
  data = {"i": jnp.arange(50), "twice": 2 * jnp.arange(50)}
  batch = jax.jit(gsnr.draw_rows, static_argnums=2)(jax.random.key(7), data, 20)
  assert len(np.unique(batch["i"])) == 20
  np.testing.assert_array_equal(batch["twice"], 2 * batch["i"])
  full = gsnr.draw_rows(jax.random.key(8), data, 50)
  np.testing.assert_array_equal(np.sort(full["i"]), np.arange(50))


def test_bad_input_raises_before_compute():
  params, data, grad_fn, traces = _mlp_setup()
  key = jax.random.key(9)
  with pytest.raises(ValueError, match="batch size 300 exceeds the pool of 256 rows"):
    gsnr.sweep(grad_fn, params, data, (8, 300), num_batches=4, key=key)
  with pytest.raises(ValueError, match="positive integers, got 0"):
    gsnr.sweep(grad_fn, params, data, (0,), num_batches=4, key=key)
  with pytest.raises(ValueError, match="num_batches must be an integer >= 2, got 1"):
    gsnr.sweep(grad_fn, params, data, (8,), num_batches=1, key=key)
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 1 or None, got 0"):
    gsnr.sweep(grad_fn, params, data, (8,), num_batches=4, key=key, chunk_size=0)
  with pytest.raises(ValueError, match="grad_fn must be callable, got 3 of type int"):
    gsnr.sweep(3, params, data, (8,), num_batches=4, key=key)
  with pytest.raises(ValueError, match="batch_size 60 exceeds the pool of 50 rows"):
    gsnr.draw_rows(key, jnp.zeros((50, 2)), 60)
  with pytest.raises(ValueError, match="at least 2 batches.*got 1"):
    gsnr.measure(grad_fn, params, (data[0][None, :8], data[1][None, :8]))
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
    gsnr.from_per_sample(jnp.ones((5, 3)), 0)
  assert not traces


# ----------------------------------------------------------------------------------------------------
# Gradient functions compare as jax.jit's static arguments do: equal records share one program.

_TRACES: list[float] = []


def _scaled_grad(scale):
  """`scale` times the linear gradient; each trace appends `scale` to `_TRACES`."""

  def grad_fn(w, batch):
    _TRACES.append(scale)
    return scale * _linear_grad(w, batch)

  return grad_fn


def test_sweep_shares_the_program_between_equal_gradient_records():
  data, w = _linear_data(jax.random.key(10), (64,))
  key = jax.random.key(11)
  compiled = gsnr._measure_drawn._cache_size
  run = functools.partial(gsnr.sweep, params=w, data=data, batch_sizes=(8,), num_batches=6, key=key)
  _TRACES.clear()
  start = compiled()
  first = run(records.recipe(_scaled_grad, scale=2.0))[8]
  assert _TRACES == [2.0] and compiled() == start + 1
  again = run(records.recipe(_scaled_grad, scale=2.0))[8]  # a new record of equal settings: no trace, no compile
  assert _TRACES == [2.0] and compiled() == start + 1
  chex.assert_trees_all_equal(tuple(again), tuple(first))

  other = run(records.recipe(_scaled_grad, scale=3.0))[8]  # another setting: its own program
  assert _TRACES == [2.0, 3.0] and compiled() == start + 2
  np.testing.assert_allclose(other.signal, 2.25 * first.signal, rtol=1e-5)
  np.testing.assert_allclose(other.aggregate, first.aggregate, rtol=1e-5)  # GSNR ignores the scale
  closure = _scaled_grad(3.0)  # a plain function is its own key: the same object reuses its program
  run(closure), run(closure)
  assert compiled() == start + 3
  with pytest.raises(ValueError, match="grad_fn must be callable"):
    run("x")
