"""Sharded programs on 8 CPU devices equal their one-device results; run by test_parallel.py in its own process.

JAX_NUM_CPU_DEVICES=8 must be set before JAX starts, which is why these cases live outside the main
test process (the file name keeps pytest's default collection away from it).
"""

from __future__ import annotations

import dataclasses
import json
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasel import core, data, dvn, gsnr, models, mts, parallel, persample, train

DEVICES = 8
LOSS = persample.softmax_cross_entropy
MODEL = models.MLP((16,), num_outputs=4)
TRANSFORMER = models.Transformer(vocab_size=50, num_outputs=3, max_length=8, width=16, depth=1, heads=2)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == DEVICES, "run with JAX_NUM_CPU_DEVICES=8 set before JAX starts"
  return parallel.data_mesh(DEVICES)


@pytest.fixture(scope="module")
def dataset():
  return data.load("mixture", seed=0, n_real=64, n_synthetic=192, n_val=64, n_test=64)


def _close(a, b, rtol=2e-4, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def _sharded(tree, mesh):
  return parallel.shard_rows(tree, mesh)


@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
def test_per_sample_norms_sharded_equal_one_device(mesh, model_name):
  key = jax.random.key(0)
  if model_name == "mlp":
    model, x = MODEL, jax.random.normal(key, (32, 6))
    y = jax.random.randint(key, (32,), 0, 4)
  else:
    model, x = TRANSFORMER, jax.random.randint(key, (32, 8), 0, 50)
    y = jax.random.randint(key, (32,), 0, 3)
  params = models.init(model, jax.random.key(1), x.shape[1:], x.dtype)
  norms = jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, LOSS))
  expected = norms(params, x, y)
  got = norms(parallel.replicate(params, mesh), *_sharded((x, y), mesh))
  assert got.sharding.spec == jax.P(parallel.DATA) or not got.sharding.is_fully_replicated
  _close(got, expected)


@pytest.mark.parametrize("normalization", ["sum", "softmax"])
@pytest.mark.parametrize("steps", [1, 3])
def test_mts_hypergradient_sharded_equals_one_device(mesh, dataset, normalization, steps):
  features = mts.loss_features(MODEL, LOSS)
  meta_net = mts.MetaNet(hidden=(8,))
  meta_params = mts.init_meta_net(meta_net, jax.random.key(2), features.width)
  params = models.init(MODEL, jax.random.key(3), dataset.input_shape)
  x, y = jnp.asarray(dataset.train.x[:64]), jnp.asarray(dataset.train.y[:64])
  val_x, val_y = jnp.asarray(dataset.val.x[:16]), jnp.asarray(dataset.val.y[:16])

  def hypergrad(params, meta_params, x, y, val_x, val_y):
    ctx = core.StepContext(params, core.Batch(jnp.arange(x.shape[0]), x, y), val_x, val_y, jax.random.key(0))
    inputs = mts.meta_inputs(features, meta_net, ctx)
    weigh = lambda phi: mts.meta_weights(meta_net, phi, inputs, normalization)
    return mts.batch_hypergrad(MODEL, LOSS, weigh, meta_params, ctx, steps=steps)

  fn = jax.jit(hypergrad)
  expected = fn(params, meta_params, x, y, val_x, val_y)
  replicated = parallel.replicate((params, meta_params, val_x, val_y), mesh)
  got = fn(*replicated[:2], *_sharded((x, y), mesh), *replicated[2:])
  _close(got.grads, expected.grads, rtol=1e-3, atol=1e-6)
  _close(got.outer_loss, expected.outer_loss)


def _recording(method: core.Method, total_steps: int, batch_size: int) -> core.Method:
  """`method` that also keeps every step's batch indices (total_steps, B) in its state."""

  def init(key, num_train):
    return method.init(key, num_train), jnp.zeros((total_steps, batch_size), jnp.int32), jnp.zeros((), jnp.int32)

  def weights(state, ctx):
    return method.weights(state[0], ctx)

  def update(state, ctx, result, carry):
    inner, seen, step = state
    inner, metrics = method.update(inner, ctx, result, carry)
    return (inner, seen.at[step].set(ctx.batch.indices), step + 1), metrics

  probs = None if method.probs is None else (lambda state: method.probs(state[0]))
  return core.Method(init, weights, update, probs, method.name, method.needs_pool, method.needs_validation)


def _methods():
  features = mts.loss_features(MODEL, LOSS)
  return {
      "uniform": core.uniform(),
      "mts": mts.mts(MODEL, LOSS, features, meta_net=mts.MetaNet(hidden=(8,))),
      "dvn": dvn.dvn(MODEL, LOSS, period=2, num_samples=16, fit_steps=2),
  }


CONFIG = train.TrainConfig(epochs=2, batch_size=32, val_batch_size=16, learning_rate=3e-3, seed=0)


@pytest.mark.parametrize("name", ["uniform", "mts", "dvn"])
def test_fit_sharded_equals_one_device_with_the_same_samples(mesh, dataset, name):
  steps = CONFIG.epochs * (len(dataset.train) // CONFIG.batch_size)
  method = _recording(_methods()[name], steps, CONFIG.batch_size)
  one = train.fit(MODEL, dataset, CONFIG, method)
  many = train.fit(MODEL, dataset, CONFIG, method, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(many.state.method_state[1]), np.asarray(one.state.method_state[1]))
  assert len(np.unique(np.asarray(one.state.method_state[1]))) > CONFIG.batch_size  # indices were recorded
  for a, b in zip(one.history, many.history):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-5, err_msg=f"{name}: {key}")
  _close(many.state.params, one.state.params, rtol=1e-3, atol=1e-5)
  assert many.state.params["Dense_0"]["kernel"].sharding.is_fully_replicated


def test_fit_on_the_ambient_mesh_compiles_each_epoch_once(mesh, dataset):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  )
  counts = []
  config = dataclasses.replace(CONFIG, epochs=4, seed=5)
  with jax.set_mesh(mesh):  # fit finds the mesh set around it
    result = train.fit(MODEL, dataset, config, _methods()["mts"], log=lambda r: counts.append(len(compiles)) if "epoch" in r else None)
  assert result.state.params["Dense_0"]["kernel"].sharding.mesh.shape == {parallel.DATA: DEVICES}
  assert counts[0] > 0 and counts[1:] == [counts[0]] * 3, counts


def test_gsnr_sweep_sharded_equals_one_device(mesh, dataset):
  params = models.init(MODEL, jax.random.key(4), dataset.input_shape)
  pool = (jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y))

  def grad_fn(params, batch):
    return jax.grad(lambda p: jnp.mean(persample.losses(MODEL, p, *batch, LOSS)))(params)

  sweep = functools.partial(gsnr.sweep, grad_fn, params, pool, (8, 32), num_batches=16, key=jax.random.key(5))
  expected = sweep()
  for strategy in ("vmap", "map"):
    got = sweep(mesh=mesh, strategy=strategy)
    for b in (8, 32):
      _close(gsnr.as_dict(got[b]), gsnr.as_dict(expected[b]), rtol=1e-4)


def test_dvn_probes_spread_over_devices(mesh, dataset):
  """The K probes' contributions are computed on the K/8 rows each device holds, equal to one device."""
  params = models.init(MODEL, jax.random.key(6), dataset.input_shape)
  ctx = core.StepContext(
      params, core.Batch(jnp.arange(8), jnp.asarray(dataset.train.x[:8]), jnp.asarray(dataset.train.y[:8])),
      jnp.asarray(dataset.val.x[:16]), jnp.asarray(dataset.val.y[:16]), jax.random.key(0),
      pool=(jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)),
  )
  features = dvn.proxy_features(MODEL, LOSS)
  probe = jax.jit(lambda ctx, rows: dvn.probe(MODEL, LOSS, features, ctx, rows, 1e-2))
  rows = jnp.arange(16) * 3
  expected = probe(ctx, rows)
  with jax.set_mesh(mesh):
    got = probe(parallel.replicate(ctx, mesh), parallel.replicate(rows, mesh))
  assert not got.contributions.sharding.is_fully_replicated  # split over the devices
  _close(got.contributions, expected.contributions, rtol=1e-3, atol=1e-7)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"num_samples \(the DVN's K probes\) of 12 does not divide over 8"):
    jax.jit(lambda ctx, rows: dvn.probe(MODEL, LOSS, features, ctx, rows, 1e-2))(ctx, rows[:12])


def test_uneven_batch_is_a_clear_error_before_compute(mesh, dataset):
  config = dataclasses.replace(CONFIG, batch_size=30)
  with pytest.raises(ValueError, match=r"batch_size of 30 does not divide over 8 devices; expected a multiple of 8"):
    train.fit(MODEL, dataset, config, mesh=mesh)
  with pytest.raises(ValueError, match=r"num_batches of 12 does not divide over 8 devices"):
    gsnr.sweep(lambda p, b: p, jnp.zeros(3), (jnp.zeros((64, 2)),), (4,), num_batches=12, key=jax.random.key(0), mesh=mesh)
  with pytest.raises(ValueError, match=r"num_devices=9 but 8 cpu devices are available"):
    parallel.data_mesh(9)


def test_the_compiled_epoch_splits_the_batch_and_all_reduces(mesh, dataset):
  """Without this, the equalities above could hold with every device computing the whole batch."""
  tx = train.make_optimizer("adam", 1e-3)
  epoch = jax.jit(train.make_epoch(train.make_step(MODEL, LOSS, tx), 16), out_shardings=parallel.replicated(mesh))
  params = models.init(MODEL, jax.random.key(0), dataset.input_shape)
  state = train.LoopState(params, tx.init(params), (), None, jnp.zeros((), jnp.int32), jax.random.key(0))
  arrays = tuple(jnp.asarray(a) for a in (dataset.train.x, dataset.train.y, dataset.val.x, dataset.val.y))
  batch = 64  # neither a feature count (32) nor a width (16) of the model
  args = parallel.replicate((state, arrays, jnp.arange(2 * batch).reshape(2, batch)), mesh)
  with jax.set_mesh(mesh):
    hlo = epoch.lower(*args).compile().as_text()
  assert "all-reduce" in hlo
  hidden = MODEL.hidden[0]
  assert f"f32[{batch // DEVICES},{hidden}]" in hlo  # the first layer's activations: 8 rows per device
  assert f"f32[{batch},{hidden}]" not in hlo


def test_command_line_devices_set_the_data_mesh(tmp_path, capsys, monkeypatch):
  from metasel import cli
  from metasel_experiments import gsnr_sweep

  seen = []
  monkeypatch.setattr(gsnr_sweep, "run", lambda config, out_dir: seen.append(parallel.resolve_mesh(None)) or {})
  assert cli.main(["run", "gsnr-sweep", "--quick", "--devices", "4", "--set", "num_batches=8", "--out", str(tmp_path)]) == 0
  assert seen[0].devices.size == 4 and parallel.resolve_mesh(None) is None  # set around the run only
  monkeypatch.undo()
  assert cli.main(["run", "gsnr-sweep", "--quick", "--devices", "8", "--out", str(tmp_path), "--run-id", "bad"]) == 2
  assert not (tmp_path / "gsnr-sweep" / "bad").exists()  # refused before any folder or compute
  assert "config field num_batches of 4 does not divide over 8 devices" in capsys.readouterr().err
  assert cli.main(["run", "gsnr-sweep", "--quick", "--devices", "9", "--out", str(tmp_path), "--run-id", "many"]) == 2
  assert "--devices 9 needs JAX_NUM_CPU_DEVICES=9 set before JAX starts" in capsys.readouterr().err
  assert not (tmp_path / "gsnr-sweep" / "many").exists()


@pytest.mark.slow
def test_command_line_devices_give_the_one_device_numbers(tmp_path):
  from metasel import cli

  def run(devices):
    argv = ["run", "gsnr-sweep", "--quick", "--dataset", "mixture", "--seeds", "0", "--out", str(tmp_path)]
    smaller = ["num_batches=8", "trace.epochs=1", "batch_sizes=8,16", "trace_batch_sizes=16"]
    argv += [item for setting in smaller for item in ("--set", setting)]
    assert cli.main([*argv, "--devices", str(devices), "--run-id", f"d{devices}"]) == 0
    return json.loads((tmp_path / "gsnr-sweep" / f"d{devices}" / "summary.json").read_text())["datasets"]["mixture"]

  many, one = run(8), run(1)
  numbers = lambda tree: jax.tree.map(float, tree)  # JSON keeps NaN (one seed's half-width) as "nan"
  _close(numbers(many["gsnr"]), numbers(one["gsnr"]), rtol=1e-3, atol=1e-7)
  _close(numbers(many["traces"]), numbers(one["traces"]), rtol=1e-3, atol=1e-6)
