"""Per-sample quantities against a naive per-example Python loop, on the MLP and the CNN."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metasel import models, persample

BATCH = 6


class NativeConvNet(nn.Module):
  """Flax's own convolution (not a ghost layer) under a `GhostDense` head: the mixed path."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3))(x)).reshape((x.shape[0], -1))
    return models.GhostDense(3)(h), h


def _setups():
  """(name, model, params, x, y, loss_fn) for an MLP, a CNN, a mixed net and a regression MLP."""
  k = jax.random.split(jax.random.key(0), 6)
  mlp = models.MLP((16, 8), num_outputs=3)
  x_mlp = jax.random.normal(k[0], (BATCH, 10))
  cnn = models.CNN((4, 6), (12,), num_outputs=3)
  x_cnn = jax.random.normal(k[1], (BATCH, 8, 8, 1))
  y_cls = jax.random.randint(k[2], (BATCH,), 0, 3)
  reg = models.MLP((8,), num_outputs=1, activation=nn.tanh)
  x_reg = jax.random.uniform(k[3], (BATCH, 1), minval=-5, maxval=5)
  y_reg = jnp.sin(x_reg[:, 0])
  return [
      ("mlp", mlp, models.init_params(mlp, k[4], (10,)), x_mlp, y_cls, persample.softmax_cross_entropy),
      ("cnn", cnn, models.init_params(cnn, k[5], (8, 8, 1)), x_cnn, y_cls, persample.softmax_cross_entropy),
      ("mixed", NativeConvNet(), models.init_params(NativeConvNet(), k[5], (8, 8, 1)), x_cnn, y_cls,
       persample.softmax_cross_entropy),
      ("regression", reg, models.init_params(reg, k[4], (1,)), x_reg, y_reg, persample.squared_error),
  ]


SETUPS = _setups()
IDS = [s[0] for s in SETUPS]


@functools.cache
def _naive_for(name):
  _, model, params, x, y, loss_fn = SETUPS[IDS.index(name)]
  return _naive(model, params, x, y, loss_fn)


def _naive(model, params, x, y, loss_fn):
  """Per-example Python loop: loss, flat gradient and embedding norm of each sample on its own."""
  rows = []
  for i in range(x.shape[0]):

    def loss_i(p):
      out, _ = model.apply({"params": p}, x[i : i + 1])
      return loss_fn(out, y[i : i + 1])[0]

    loss, grad = jax.value_and_grad(loss_i)(params)
    _, emb = model.apply({"params": params}, x[i : i + 1])
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad)])
    rows.append((float(loss), flat, float(np.linalg.norm(emb[0]))))
  losses, flats, emb_norms = zip(*rows)
  return np.array(losses), np.stack(flats), np.array(emb_norms)


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-6 * np.max(np.abs(expected)))


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  return jax.jit if request.param else (lambda f, **kw: f)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_losses_grads_and_embedding_norms_match_loop(setup, maybe_jit):
  name, model, params, x, y, loss_fn = setup
  losses, flats, emb_norms = _naive_for(name)
  _close(maybe_jit(lambda p, x, y: persample.losses(model, p, x, y, loss_fn))(params, x, y), losses)
  _close(maybe_jit(lambda p, x: persample.embedding_norms(model, p, x))(params, x), emb_norms)
  for chunk in (None, 4):
    g = maybe_jit(lambda p, x, y: persample.grads(model, p, x, y, loss_fn, chunk_size=chunk))(params, x, y)
    flat = np.concatenate([np.reshape(leaf, (BATCH, -1)) for leaf in jax.tree.leaves(g)], axis=1)
    _close(flat, flats)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
@pytest.mark.parametrize("method,chunk", [("ghost", None), ("ghost", 4), ("vmap", None), ("vmap", 4)])
def test_grad_norms_match_loop(setup, method, chunk, maybe_jit):
  name, model, params, x, y, loss_fn = setup
  _, flats, _ = _naive_for(name)
  fn = maybe_jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn, method=method, chunk_size=chunk))
  _close(fn(params, x, y), np.linalg.norm(flats, axis=1))


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_grad_dots_match_loop(setup, method, maybe_jit):
  name, model, params, x, y, loss_fn = setup
  _, flats, _ = _naive_for(name)
  # A reference gradient unlike any single sample's: a random direction in parameter space.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  ref = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  ref_flat = np.concatenate([np.ravel(l) for l in jax.tree.leaves(ref)])
  fn = maybe_jit(lambda p, x, y, r: persample.grad_dots(model, p, x, y, r, loss_fn, method=method, chunk_size=4))
  _close(fn(params, x, y, ref), flats @ ref_flat)


@pytest.mark.parametrize("setup", SETUPS[:3], ids=IDS[:3])
def test_ghost_and_vmap_paths_agree(setup):
  _, model, params, x, y, loss_fn = setup
  ghost = persample.grad_norms(model, params, x, y, loss_fn, method="ghost")
  vmapped = persample.grad_norms(model, params, x, y, loss_fn, method="vmap")
  np.testing.assert_allclose(ghost, vmapped, rtol=1e-5)


def test_record_tape_has_every_dense_layer():
  _, model, params, x, y, loss_fn = SETUPS[0]
  tape = persample.record(model, params, x, y, loss_fn)
  assert set(tape.inputs) == set(tape.output_grads) == {("GhostDense_0",), ("GhostDense_1",), ("GhostDense_2",)}
  assert tape.inputs[("GhostDense_0",)].shape == (BATCH, 10)
  assert tape.output_grads[("GhostDense_2",)].shape == (BATCH, 3)
  assert tape.embeddings.shape == (BATCH, 8)
  # For cross-entropy the loss-to-logit gradient is softmax - onehot.
  expected = jax.nn.softmax(tape.outputs) - jax.nn.one_hot(y, 3)
  np.testing.assert_allclose(tape.output_grads[("GhostDense_2",)], expected, atol=1e-6)


def test_second_call_does_not_recompile():
  _, model, params, x, y, loss_fn = SETUPS[0]
  fn = jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, loss_fn))
  fn(params, x, y)
  fn(jax.tree.map(lambda l: l + 1.0, params), x + 1.0, y)
  assert fn._cache_size() == 1


def test_mismatched_batch_is_rejected():
  _, model, params, x, y, loss_fn = SETUPS[0]
  with pytest.raises(ValueError, match="batch size: x has 6 rows, y has 5"):
    persample.grad_norms(model, params, x, y[:5], loss_fn)
  with pytest.raises(ValueError, match=r"targets must have shape \(batch,\)"):
    persample.losses(model, params, x, y[:, None], loss_fn)


def test_unknown_method_and_bad_reference_are_rejected():
  _, model, params, x, y, loss_fn = SETUPS[0]
  with pytest.raises(ValueError, match="'ghost' or 'vmap', got 'naive'"):
    persample.grad_norms(model, params, x, y, loss_fn, method="naive")
  partial_ref = {"GhostDense_0": params["GhostDense_0"]}
  with pytest.raises(ValueError, match="GhostDense_1/kernel"):
    persample.grad_dots(model, params, x, y, partial_ref, loss_fn)


def test_shared_dense_layer_is_rejected():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = models.GhostDense(4)
      h = layer(layer(x))
      return h, h

  model = Shared()
  params = models.init_params(model, jax.random.key(0), (4,))
  with pytest.raises(ValueError, match="called 2 times"):
    persample.record(model, params, jnp.ones((2, 4)), jnp.zeros(2, jnp.int32), persample.softmax_cross_entropy)


def test_ghost_dense_rejects_input_without_batch_axis():
  with pytest.raises(ValueError, match=r"shape \(batch, ..., features\), got shape \(3,\)"):
    models.GhostDense(3).init(jax.random.key(0), jnp.ones((3,)))


def test_ghost_conv_equals_flax_conv_and_its_patches_match_the_kernel_matrix():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  conv = nn.Conv(5, (3, 3))
  params = conv.init(jax.random.key(1), x)["params"]
  expected = conv.apply({"params": params}, x)
  ghost = models.GhostConv(5)
  np.testing.assert_allclose(ghost.apply({"params": params}, x), expected, atol=1e-5)
  _, recorded = ghost.apply({"params": params}, x, mutable=[models.GHOST_INPUTS])
  (patches,) = recorded[models.GHOST_INPUTS]["inputs"]  # (2, 7, 7, 27)
  as_dense = patches @ models.kernel_as_matrix(params["kernel"]) + params["bias"]
  np.testing.assert_allclose(as_dense, expected, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,padding", [((2, 7, 7, 3), (3, 3), "SAME"), ((2, 6, 5, 2), (2, 4), "SAME"), ((1, 6, 5, 2), (3, 2), "VALID")])
def test_image_patches_match_lax(shape, kernel, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  expected = jax.lax.conv_general_dilated_patches(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(models.image_patches(x, kernel, padding), expected)


def test_cnn_takes_the_ghost_path_for_every_layer():
  _, model, params, x, y, loss_fn = SETUPS[1]
  tape = persample.record(model, params, x, y, loss_fn)
  assert len(tape.inputs) == len(jax.tree.leaves(params)) // 2  # kernel and bias of each layer
  assert tape.inputs[("GhostConv_0",)].shape == (BATCH, 8, 8, 9)
