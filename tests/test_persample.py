"""Per-sample quantities on users' own models (plain linen, NNX, a pure function) against a naive per-example loop."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from zoo import BATCH, LOSS, NAMES, ZOO, LinenMLP, LinenMLPWithEmbedding, close, flat, naive

from metasel import contributions, models, mts, persample, tape

pytestmark = pytest.mark.filterwarnings("ignore:.*take the slow vmap path")


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  return jax.jit if request.param else (lambda f: f)


@pytest.mark.parametrize("name", NAMES)
def test_losses_and_gradients_match_loop(name, maybe_jit):
  case = ZOO[name]
  losses, grads = naive(name)
  close(maybe_jit(lambda p, x, y: persample.losses(case.model, p, x, y, LOSS))(case.params, case.x, case.y), losses)
  for chunk in (None, 4) if maybe_jit is jax.jit else (None,):
    g = maybe_jit(lambda p, x, y: persample.grads(case.model, p, x, y, LOSS, chunk_size=chunk))(case.params, case.x, case.y)
    close(np.concatenate([np.reshape(leaf, (BATCH, -1)) for leaf in jax.tree.leaves(g)], axis=1), grads)


# Eager runs check jit equals eager on the ghost path; the other paths run jitted only.
PATHS = [("ghost", None, False), ("ghost", None, True), ("ghost", 4, True), ("vmap", None, True), ("vmap", 4, True)]
PATH_IDS = ["ghost-eager", "ghost-jit", "ghost-chunked-jit", "vmap-jit", "vmap-chunked-jit"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,chunk,jitted", PATHS, ids=PATH_IDS)
def test_grad_norms_match_loop(name, method, chunk, jitted):
  case = ZOO[name]
  _, grads = naive(name)
  fn = lambda p, x, y: persample.grad_norms(case.model, p, x, y, LOSS, method=method, chunk_size=chunk)  # noqa: E731
  close((jax.jit(fn) if jitted else fn)(case.params, case.x, case.y), np.linalg.norm(grads, axis=1))


def _random_like(params, seed: int = 7):
  """A reference gradient unlike any single sample's: a random direction in parameter space."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,chunk,jitted", PATHS[:2] + PATHS[-1:], ids=PATH_IDS[:2] + PATH_IDS[-1:])
def test_grad_dots_match_loop(name, method, chunk, jitted):
  case = ZOO[name]
  _, grads = naive(name)
  ref = _random_like(case.params)
  fn = lambda p, x, y, r: persample.grad_dots(case.model, p, x, y, r, LOSS, method=method, chunk_size=chunk)  # noqa: E731
  close((jax.jit(fn) if jitted else fn)(case.params, case.x, case.y, ref), grads @ flat(ref))


def _naive_contributions(case, step_size, val_x, val_y):
  base = float(jnp.mean(persample.losses(case.model, case.params, val_x, val_y, LOSS)))
  out = []
  for i in range(BATCH):
    grad = jax.grad(lambda p: persample.losses(case.model, p, case.x[i : i + 1], case.y[i : i + 1], LOSS)[0])(case.params)
    stepped = jax.tree.map(lambda p, g: p - step_size * g, case.params, grad)
    out.append(base - float(jnp.mean(persample.losses(case.model, stepped, val_x, val_y, LOSS))))
  return np.array(out)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method,jitted", [("ghost", False), ("ghost", True), ("vmap", True)], ids=["ghost-eager", "ghost-jit", "vmap-jit"])
def test_dvn_contributions_match_loop(name, method, jitted):
  case = ZOO[name]
  val_x, val_y = case.x[::-1], jnp.roll(case.y, 1)  # a validation batch unlike the probed rows
  expected = _naive_contributions(case, 0.05, val_x, val_y)
  fn = lambda p, x, y, vx, vy: contributions.contributions(case.model, LOSS, p, x, y, vx, vy, 0.05, method=method)  # noqa: E731
  close((jax.jit(fn) if jitted else fn)(case.params, case.x, case.y, val_x, val_y), expected, rtol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_mts_hypergradient_matches_closed_form_loop(name, maybe_jit):
  """d L_val(theta - lr sum_i w_i grad l_i) / d w_i = -lr <grad L_val(theta'), grad l_i(theta)>, sample by sample."""
  case = ZOO[name]
  lr, weights = 0.1, jnp.full((BATCH,), 1.0 / BATCH)
  val_x, val_y = case.x[::-1], jnp.roll(case.y, 1)
  per_sample_loss = lambda p, x, y: persample.losses(case.model, p, x, y, LOSS)  # noqa: E731
  outer = lambda p: jnp.mean(per_sample_loss(p, val_x, val_y))  # noqa: E731

  def hypergradient(params, weights):
    return mts.hypergrad(
        lambda w: w, weights[None], outer, per_sample_loss, optax.sgd, params, optax.sgd(lr).init(params),
        (case.x[None], case.y[None]), lr,
    ).grads[0]

  stepped = jax.tree.map(lambda p, g: p - lr * g, case.params, jax.grad(lambda p: jnp.sum(weights * per_sample_loss(p, case.x, case.y)))(case.params))
  outer_grad = flat(jax.grad(outer)(stepped))
  _, grads = naive(name)
  close(maybe_jit(hypergradient)(case.params, weights), -lr * grads @ outer_grad)


@pytest.mark.parametrize("name", NAMES)
def test_coverage_names_the_ghost_and_fallback_parameters(name):
  case = ZOO[name]
  report = persample.coverage(case.model, case.params, case.x)
  assert set(report.ghost) == case.ghost
  assert set(report.fallback) == set(persample.leaf_names(case.params)) - case.ghost
  assert all(reason for reason in report.fallback.values())
  assert 0.0 <= report.ghost_share <= 1.0
  assert (report.ghost_share == 1.0) == (not report.fallback)
  assert str(report).startswith("ghost path:")


def test_coverage_says_why_a_layer_falls_back():
  report = persample.coverage(ZOO["grouped-conv"].model, ZOO["grouped-conv"].params, ZOO["grouped-conv"].x)
  assert "grouped convolution" in report.fallback["Conv_0/kernel"]
  assert "not a parameter of a supported layer" in report.fallback["gate"]
  function = persample.coverage(ZOO["function"].model, ZOO["function"].params, ZOO["function"].x)
  assert function.ghost_share == 0.0 and "not a parameter of a supported layer" in function.fallback["w"]


def test_a_table_used_as_its_own_head_takes_the_ghost_path():
  class TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(12, 4)
      h = embed(ids).mean(axis=1)
      return embed.attend(h)  # logits over the 12 ids through the same table

  model = TiedEmbedding()
  ids = jnp.array([[1, 2, 3], [4, 4, 5]])
  params = models.init(model, jax.random.key(0), (3,), jnp.int32)
  report = persample.coverage(model, params, ids)
  assert report.ghost["Embed_0/embedding"] == "Embed_0 (Embed + Embed.attend)" and not report.fallback
  y = jnp.array([3, 7])
  expected = [
      float(optax.global_norm(jax.grad(lambda p: persample.losses(model, p, ids[i : i + 1], y[i : i + 1], LOSS)[0])(params)))
      for i in range(2)
  ]
  close(persample.grad_norms(model, params, ids, y, LOSS), expected)


def test_a_layer_applied_twice_joins_its_calls():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = nn.Dense(4)
      return nn.Dense(3)(nn.relu(layer(nn.relu(layer(x)))))

  model = Shared()
  params = models.init(model, jax.random.key(0), (4,))
  x, y = jax.random.normal(jax.random.key(1), (5, 4)), jnp.array([0, 1, 2, 0, 1])
  assert set(persample.coverage(model, params, x).ghost) == set(persample.leaf_names(params))
  expected = [
      float(optax.global_norm(jax.grad(lambda p: persample.losses(model, p, x[i : i + 1], y[i : i + 1], LOSS)[0])(params)))
      for i in range(5)
  ]
  close(persample.grad_norms(model, params, x, y, LOSS), expected)


def test_ghost_path_warns_once_per_model_when_much_of_it_falls_back():
  case = ZOO["function"]
  model = models.as_model(lambda p, x: case.model(p, x))  # a model no other test has warned about
  with pytest.warns(UserWarning, match="100% of the parameters .* take the slow vmap path"):
    persample.grad_norms(model, case.params, case.x, case.y, LOSS)
  with warnings_as_errors():
    persample.grad_norms(model, case.params, case.x, case.y, LOSS)


def warnings_as_errors():
  import warnings

  manager = warnings.catch_warnings()
  manager.__enter__()
  warnings.simplefilter("error")

  class _Exit:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      manager.__exit__(*exc)

  return _Exit()


def test_logits_only_model_takes_its_embedding_from_the_last_dense_input():
  case = ZOO["linen-mlp"]
  _, expected = LinenMLPWithEmbedding().apply({"params": case.params}, case.x)
  close(persample.embeddings(case.model, case.params, case.x), expected)
  close(persample.embedding_norms(case.model, case.params, case.x), np.linalg.norm(expected, axis=1))
  recorded = persample.record(case.model, case.params, case.x, case.y, LOSS)
  close(recorded.embeddings, expected)
  # For cross-entropy the loss-to-logit gradient of the head is softmax - onehot.
  head = next(layer for layer in recorded.layers if layer.info.name == "Dense_2")
  close(head.grads[:, 0], jax.nn.softmax(recorded.outputs) - jax.nn.one_hot(case.y, 3))


def test_record_tapes_sequence_layers_per_position():
  case = ZOO["transformer"]
  recorded = persample.record(case.model, case.params, case.x, case.y, LOSS)
  by_name = {layer.info.name: layer for layer in recorded.layers}
  assert by_name["tokens"].info.kind == "embed" and by_name["tokens"].rows.shape == (BATCH, 6)
  assert by_name["MultiHeadDotProductAttention_0/query"].rows.shape == (BATCH, 6, 8)
  assert by_name["MultiHeadDotProductAttention_0/out"].rows.shape == (BATCH, 6, 8)  # (heads, head_dim) joined
  assert by_name["LayerNorm_0"].info.kind == "norm"


@pytest.mark.parametrize("name", ["linen-mlp", "nnx-mlp", "transformer"])
def test_second_call_does_not_recompile(name):
  case = ZOO[name]
  chex.clear_trace_counter()  # the counter is keyed by the function's code, shared by the parametrisations

  @jax.jit
  @chex.assert_max_traces(n=1)
  def norms_and_dots(params, x, y, ref):
    return persample.grad_norms(case.model, params, x, y, LOSS), persample.grad_dots(case.model, params, x, y, ref, LOSS)

  ref = _random_like(case.params)
  norms_and_dots(case.params, case.x, case.y, ref)
  norms_and_dots(jax.tree.map(lambda leaf: leaf * 1.5, case.params), case.x, jnp.roll(case.y, 1), ref)


def test_mismatched_batch_and_bad_reference_are_rejected():
  case = ZOO["linen-mlp"]
  with pytest.raises(ValueError, match="batch size: x has 6 rows, y has 5"):
    persample.grad_norms(case.model, case.params, case.x, case.y[:5], LOSS)
  with pytest.raises(ValueError, match=r"targets must have shape \(batch,\)"):
    persample.losses(case.model, case.params, case.x, case.y[:, None], LOSS)
  with pytest.raises(ValueError, match="'ghost' or 'vmap', got 'naive'"):
    persample.grad_norms(case.model, case.params, case.x, case.y, LOSS, method="naive")
  with pytest.raises(ValueError, match="ref_grad must have the structure of params"):
    persample.grad_dots(case.model, case.params, case.x, case.y, {"Dense_0": case.params["Dense_0"]}, LOSS)


@pytest.mark.parametrize(
    "output,message",
    [
        (lambda h: (h, h, h), r"a tuple of 3"),
        (lambda h: {"logits": h}, r"a dict"),
        (lambda h: h[:, 0], r"an array of shape \((\d+),\); expected an array of shape \(\1, n\)"),
        (lambda h: (h, h[:, 0]), r"embedding as an array of shape \(\d+,\)"),
    ],
)
def test_a_model_whose_output_is_neither_logits_nor_a_pair_is_rejected(output, message):
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return output(nn.Dense(3)(x))

  with pytest.raises(ValueError, match=message):
    models.init(Odd(), jax.random.key(0), (10,))
  with pytest.raises(ValueError, match=message):  # the same from a function model, at the first call
    persample.losses(lambda p, x: output(x[:, :3]), {}, ZOO["linen-mlp"].x, ZOO["linen-mlp"].y, LOSS)


def test_models_with_state_or_randomness_are_refused_naming_it():
  class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x))

  class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.Dropout(0.5, deterministic=False)(x))

  with pytest.raises(ValueError, match=r"holds the collection\(s\) \['batch_stats'\]"):
    models.init(WithBatchNorm(), jax.random.key(0), (10,))
  with pytest.raises(ValueError, match="dropout"):
    models.init(WithDropout(), jax.random.key(0), (10,))

  from flax import nnx

  class NNXBatchNorm(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.BatchNorm(10, rngs=rngs)
      self.out = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.norm(x))

  with pytest.raises(ValueError, match="BatchStat"):
    models.as_model(NNXBatchNorm(nnx.Rngs(0)))


def test_a_function_model_needs_its_params():
  with pytest.raises(ValueError, match="function without an init; pass its parameters"):
    models.init(ZOO["function"].model, jax.random.key(0), (10,))


def test_transformer_rejects_inputs_that_are_not_token_ids():
  model = ZOO["transformer"].model
  with pytest.raises(ValueError, match="integer token ids of shape \\(batch, length\\).*representation='tokens'"):
    models.init(model, jax.random.key(0), (6,))  # float inputs
  with pytest.raises(ValueError, match="exceed the Transformer's max_length=6"):
    models.init(model, jax.random.key(0), (9,), jnp.int32)


def test_transformer_without_a_padding_id_needs_a_mask():
  model = models.Transformer(vocab_size=30, num_outputs=3, max_length=6, width=8, depth=1, heads=2, pad_id=None)
  tokens = ZOO["transformer"].x
  with pytest.raises(ValueError, match="needs its mask .* pass mask="):
    models.init(model, jax.random.key(0), (6,), jnp.int32)
  params = model.init(jax.random.key(0), tokens, tokens != 0)["params"]
  padded = models.Transformer(vocab_size=30, num_outputs=3, max_length=6, width=8, depth=1, heads=2)
  close(model.apply({"params": params}, tokens, tokens != 0), padded.apply({"params": params}, tokens))


def test_equal_models_are_equal_and_share_compiled_programs():
  from flax import nnx

  from zoo import NNXMLP

  assert models.as_model(LinenMLP()) == models.as_model(LinenMLP())
  assert models.as_model(NNXMLP(nnx.Rngs(0))) == models.as_model(NNXMLP(nnx.Rngs(5)))
  assert hash(models.as_model(LinenMLP())) == hash(models.as_model(LinenMLP()))
  assert models.as_model(LinenMLP()) != models.as_model(ZOO["linen-cnn"].model)


def test_tape_leaves_the_users_nnx_module_untouched():
  case = ZOO["nnx-mlp"]
  persample.grad_norms(case.model, case.params, case.x, case.y, LOSS)
  assert type(case.model.hidden).__name__ == "Linear"
  assert not hasattr(case.model.hidden, "_metasel_name")
  assert tape.forward(models.as_model(case.model), case.params, case.x).outputs.shape == (BATCH, 3)


def test_layers_under_transformations_inside_the_model_fall_back_exactly():
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
          return nn.relu(nn.Dense(10)(h)), None

      h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x, None)
      return nn.Dense(3)(nn.relu(nn.remat(nn.Dense)(6)(h)))

  model = Scanned()
  case = ZOO["linen-mlp"]
  params = models.init(model, jax.random.key(0), (10,))
  report = persample.coverage(model, params, case.x)
  assert set(report.ghost) == {"Dense_0/kernel", "Dense_0/bias"}
  assert all("transformation inside the model" in reason for reason in report.fallback.values())
  expected = [
      float(optax.global_norm(jax.grad(lambda p: persample.losses(model, p, case.x[i : i + 1], case.y[i : i + 1], LOSS)[0])(params)))
      for i in range(BATCH)
  ]
  close(jax.jit(lambda p: persample.grad_norms(model, p, case.x, case.y, LOSS))(params), expected)


def test_nnx_conv_embed_and_general_layers_take_the_ghost_path():
  from flax import nnx

  class NNXImages(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
      self.dilated = nnx.Conv(4, 3, (2, 2), kernel_dilation=2, padding="VALID", rngs=rngs)
      self.out = nnx.Linear(3 * 3 * 3, 3, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.dilated(nnx.relu(self.conv(x))))
      return self.out(h.reshape(h.shape[0], -1))

  class NNXTokens(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(30, 8, rngs=rngs)
      self.mix = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      self.norm = nnx.RMSNorm(8, rngs=rngs)
      self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
      h = self.mix(self.embed(ids)).reshape(ids.shape[0], ids.shape[1], 8)
      return self.out(self.norm(h).mean(axis=1))

  images, tokens = ZOO["linen-cnn"], ZOO["transformer"]
  for model, x, y in ((NNXImages(nnx.Rngs(0)), images.x, images.y), (NNXTokens(nnx.Rngs(1)), tokens.x, tokens.y)):
    params = models.init(model, jax.random.key(0), x.shape[1:], x.dtype)
    assert persample.coverage(model, params, x).ghost_share == 1.0
    grads = np.stack([
        flat(jax.grad(lambda p: persample.losses(model, p, x[i : i + 1], y[i : i + 1], LOSS)[0])(params)) for i in range(BATCH)
    ])
    ref = _random_like(params)
    norms, dots = jax.jit(
        lambda p, r: (persample.grad_norms(model, p, x, y, LOSS), persample.grad_dots(model, p, x, y, r, LOSS))
    )(params, ref)
    close(norms, np.linalg.norm(grads, axis=1))
    close(dots, grads @ flat(ref))
