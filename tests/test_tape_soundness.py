"""The tape never returns a number the model's own gradients disagree with, on models built to break it.

Each case is a model whose parameters reach the loss in a way a layer-by-layer tape could miss: a head
tied to the token table through a nested `.apply` or through `Embed.attend`, a kernel read outside its
layer, a weight-normalised kernel, a parameter fed into another layer, a layer called twice, a shared
scope, `nn.jit` / `nn.remat` / `nn.scan` around parts, boxed partitioned parameters, and NNX twins.
Per-sample norms, dots, ghost influence, interactions and one-step contributions are compared with a
naive per-example loop in float64 (1e-5 relative), norms and interactions again at parameters and batches
drawn by hypothesis, and `coverage` must name the path each leaf takes and why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasel import contributions, influence, models, persample

pytestmark = pytest.mark.filterwarnings("ignore:.*take the slow vmap path")

BATCH, VAL, VOCAB, WIDTH, LENGTH, CLASSES = 4, 3, 11, 6, 4, 3
FEATURES = 5
LOSS = persample.softmax_cross_entropy
ETA = 0.5  # far from the linear regime, so contributions test the stepped model itself
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Linen models


class TiedByNestedApply(nn.Module):
  """GPT-2 style: the LM head is a Dense applied to the transposed token table through a nested `.apply`."""

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(VOCAB, WIDTH, name="wte")
    h = nn.LayerNorm()(nn.relu(nn.Dense(WIDTH)(wte(ids))))
    head = nn.Dense(VOCAB, use_bias=False)
    return head.apply({"params": {"kernel": wte.variables["params"]["embedding"].T}}, h).reshape(ids.shape[0], -1)


class TiedByAttend(nn.Module):
  """The same tied LM written with `Embed.attend`: lookup and head both visible to the tape."""

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(VOCAB, WIDTH, name="wte")
    h = nn.LayerNorm()(nn.relu(nn.Dense(WIDTH)(wte(ids))))
    return wte.attend(h).reshape(ids.shape[0], -1)


class AttendOnly(nn.Module):
  """A table used only as a classification head (`attend`, no lookup)."""

  @nn.compact
  def __call__(self, x):
    return nn.Embed(CLASSES, WIDTH, name="classes").attend(nn.relu(nn.Dense(WIDTH)(x)))


class KernelReadOutside(nn.Module):
  """The output is scaled by the norm of the last layer's own kernel (a weight-norm written by hand)."""

  @nn.compact
  def __call__(self, x):
    head = nn.Dense(CLASSES)
    logits = head(nn.relu(nn.Dense(WIDTH)(x)))
    return logits / jnp.linalg.norm(head.variables["params"]["kernel"])


class WeightNormed(nn.Module):
  """flax's own `nn.WeightNorm`: the Dense sees a kernel computed from its parameters."""

  @nn.compact
  def __call__(self, x):
    return nn.WeightNorm(nn.Dense(CLASSES))(nn.relu(nn.Dense(WIDTH)(x)))


class ParameterIntoCall(nn.Module):
  """One layer's bias is added to the input of the next layer's call."""

  @nn.compact
  def __call__(self, x):
    first = nn.Dense(WIDTH)
    h = nn.relu(first(x))
    return nn.Dense(CLASSES)(h + first.variables["params"]["bias"])


class CalledTwice(nn.Module):
  """One Dense applied twice in a row: its gradient sums both calls."""

  @nn.compact
  def __call__(self, x):
    square = nn.Dense(FEATURES)
    return nn.Dense(CLASSES)(nn.relu(square(nn.relu(square(x)))))


class LoRA(nn.Module):
  """flax's `share_scope` example: a Dense with low-rank factors living in its own scope."""

  base: nn.Dense

  def setup(self):
    nn.share_scope(self, self.base)

  @nn.compact
  def __call__(self, x):
    a = self.param("A", nn.initializers.normal(0.5), (x.shape[-1], 2))
    b = self.param("B", nn.initializers.normal(0.5), (2, self.base.features))
    return self.base(x) + x @ a @ b


class SharedScope(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.relu(LoRA(nn.Dense(WIDTH))(x)))


class KernelTiedBetweenLayers(nn.Module):
  """Two layers share a kernel but keep biases of their own (the second through a nested `.apply`)."""

  @nn.compact
  def __call__(self, x):
    first = nn.Dense(FEATURES)
    h = nn.relu(first(x))
    bias = self.param("second_bias", nn.initializers.normal(0.5), (FEATURES,))
    second = nn.Dense(FEATURES).apply({"params": {"kernel": first.variables["params"]["kernel"], "bias": bias}}, h)
    return nn.Dense(CLASSES)(nn.relu(second))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(WIDTH)(x))))


class JittedBlock(nn.Module):
  """A block wrapped in `nn.jit`, as LM libraries wrap their layers."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.jit(Block)()(x))


class RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.remat(Block)()(x))


class ScannedBlocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Step(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.relu(nn.Dense(FEATURES)(h)), None

    h, _ = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x, None)
    return nn.Dense(CLASSES)(h)


class Partitioned(nn.Module):
  """Kernels with logical and mesh partitioning metadata: `init` returns boxed parameters."""

  @nn.compact
  def __call__(self, x):
    logical = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    meshed = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None))
    return nn.Dense(CLASSES, kernel_init=meshed)(nn.relu(nn.Dense(WIDTH, kernel_init=logical)(x)))


# ----------------------------------------------------------------------------------------------------
# NNX twins


class NNXTiedByAttend(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.wte = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.mix = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)

  def __call__(self, ids):
    h = self.norm(nnx.relu(self.mix(self.wte(ids))))
    return self.wte.attend(h).reshape(ids.shape[0], -1)


class NNXKernelReadOutside(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(FEATURES, WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x))) / jnp.linalg.norm(self.head.kernel[...])


class NNXCalledTwice(nnx.Module):
  """One Linear reached through two attributes and called twice."""

  def __init__(self, rngs: nnx.Rngs):
    self.square = nnx.Linear(FEATURES, FEATURES, rngs=rngs)
    self.again = self.square
    self.head = nnx.Linear(FEATURES, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.again(nnx.relu(self.square(x)))))


class NNXTransformed(nnx.Module):
  """The hidden layer under `transform` (nnx.jit or nnx.remat)."""

  def __init__(self, transform: Callable, rngs: nnx.Rngs):
    self.transform = transform
    self.hidden = nnx.Linear(FEATURES, WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(self.transform(lambda layer, v: nnx.relu(layer(v)))(self.hidden, x))


class NNXScanned(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
      return nnx.Linear(FEATURES, FEATURES, rngs=rngs)

    self.blocks = stack(rngs)
    self.head = nnx.Linear(FEATURES, CLASSES, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return nnx.relu(block(h))

    return self.head(body(x, self.blocks))


class NNXPartitioned(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    sharded = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    self.hidden = nnx.Linear(FEATURES, WIDTH, kernel_init=sharded, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x)))


def _nnx_partitioned():
  """Built under a mesh, as sharded NNX models are: its kernel carries sharding metadata."""
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    model = NNXPartitioned(nnx.Rngs(0))
  assert model.hidden.kernel.get_metadata()["out_sharding"] == (None, "model")
  return model


# ----------------------------------------------------------------------------------------------------
# The zoo: each model, its inputs, and what `coverage` must say per leaf ("ghost", or a reason's words).


class Case(NamedTuple):
  build: Callable[[], Any]
  tokens: bool  # integer ids (B, LENGTH) with a per-position head, or features (B, FEATURES)
  fallback: dict[str, str]  # leaf -> words of its vmap reason; every other leaf takes the ghost path
  boxed: bool = False  # pass the params as `init` returns them


OUTSIDE = "also used outside its layer"
SHARES = "shares its layer with"
TRANSFORMED = "transformation inside the model"
COMPUTED = "computed inside the model"
UNSUPPORTED = "not a parameter of a supported layer"

CASES = {
    "tied-nested-apply": Case(TiedByNestedApply, True, {"wte/embedding": f"{OUTSIDE}, by transpose"}),
    "tied-attend": Case(TiedByAttend, True, {}),
    "attend-only": Case(AttendOnly, False, {}),
    "kernel-read-outside": Case(KernelReadOutside, False, {"Dense_0/kernel": OUTSIDE, "Dense_0/bias": SHARES}),
    "weight-norm": Case(WeightNormed, False, {
        "Dense_0/kernel": COMPUTED, "Dense_0/bias": COMPUTED, "WeightNorm_0/Dense_0/kernel/scale": UNSUPPORTED,
    }),
    "parameter-into-call": Case(ParameterIntoCall, False, {"Dense_0/bias": OUTSIDE, "Dense_0/kernel": SHARES}),
    "called-twice": Case(CalledTwice, False, {}),
    "shared-scope": Case(SharedScope, False, {"Dense_1/A": UNSUPPORTED, "Dense_1/B": UNSUPPORTED}),
    "kernel-tied-between-layers": Case(KernelTiedBetweenLayers, False, {
        "Dense_0/kernel": "shares parameters with", "Dense_0/bias": "shares parameters with", "second_bias": "shares parameters with",
    }),
    "nn.jit": Case(JittedBlock, False, {}),
    "nn.remat": Case(RematBlock, False, {
        f"CheckpointBlock_0/{leaf}": TRANSFORMED
        for leaf in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias", "LayerNorm_0/scale", "LayerNorm_0/bias")
    }),
    "nn.scan": Case(ScannedBlocks, False, {"ScanStep_0/Dense_0/kernel": TRANSFORMED, "ScanStep_0/Dense_0/bias": TRANSFORMED}),
    "boxed-partitioned": Case(Partitioned, False, {}, boxed=True),
    "nnx-tied-attend": Case(lambda: NNXTiedByAttend(nnx.Rngs(0)), True, {}),
    "nnx-kernel-read-outside": Case(lambda: NNXKernelReadOutside(nnx.Rngs(0)), False, {"head/kernel": OUTSIDE, "head/bias": SHARES}),
    "nnx-called-twice": Case(lambda: NNXCalledTwice(nnx.Rngs(0)), False, {}),
    "nnx.jit": Case(lambda: NNXTransformed(nnx.jit, nnx.Rngs(0)), False, {}),
    "nnx.remat": Case(lambda: NNXTransformed(nnx.remat, nnx.Rngs(0)), False, {"hidden/kernel": TRANSFORMED, "hidden/bias": TRANSFORMED}),
    "nnx.scan": Case(lambda: NNXScanned(nnx.Rngs(0)), False, {"blocks/kernel": TRANSFORMED, "blocks/bias": TRANSFORMED}),
    "nnx-partitioned": Case(_nnx_partitioned, False, {}),
}


class Problem(NamedTuple):
  model: Any
  params: Any
  x: jax.Array
  y: jax.Array
  val_x: jax.Array
  val_y: jax.Array


def _inputs(key, count: int, tokens: bool) -> tuple[jax.Array, jax.Array]:
  k1, k2 = jax.random.split(key)
  if tokens:
    ids = jax.random.randint(k1, (count, LENGTH), 0, VOCAB)
    ids = ids.at[:, 1].set(ids[:, 0])  # a repeated id within each row: its table rows add up
    return ids, jax.random.randint(k2, (count,), 0, LENGTH * VOCAB)
  return jax.random.normal(k1, (count, FEATURES), jnp.float64), jax.random.randint(k2, (count,), 0, CLASSES)


@functools.cache
def _problem(name: str) -> Problem:
  """The case's model, float64 params (boxed where the case says) and a training and a validation batch."""
  case = CASES[name]
  x, y = _inputs(jax.random.key(1), BATCH, case.tokens)
  val_x, val_y = _inputs(jax.random.key(2), VAL, case.tokens)
  model = case.build()
  if isinstance(model, nnx.Module):
    params = models.init(model, jax.random.key(0), x.shape[1:], x.dtype)
  else:
    params = model.init(jax.random.key(0), x)["params"]
    params = params if case.boxed else nn.meta.unbox(params)
  to_64 = lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
  return Problem(model, jax.tree.map(to_64, params), x, y, val_x, val_y)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _mean_loss(problem: Problem, params, x, y) -> jax.Array:
  return jnp.mean(persample.losses(problem.model, params, x, y, LOSS))


def _naive(problem: Problem) -> dict[str, np.ndarray]:
  """Per-sample gradients (B, P), one `jax.grad` per sample, and what the tests derive from them."""
  grad = jax.jit(jax.grad(lambda p, x, y: _mean_loss(problem, p, x, y)))
  trees = [grad(problem.params, problem.x[i : i + 1], problem.y[i : i + 1]) for i in range(BATCH)]
  stepped = [jax.tree.map(lambda p, g: p - ETA * g, problem.params, tree) for tree in trees]
  val_loss = jax.jit(lambda p: _mean_loss(problem, p, problem.val_x, problem.val_y))
  return {
      "grads": np.stack([_flat(tree) for tree in trees]),
      "val_grad": _flat(grad(problem.params, problem.val_x, problem.val_y)),
      "contributions": np.array([float(val_loss(problem.params) - val_loss(p)) for p in stepped]),
  }


def _close(actual, expected) -> None:
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=RTOL * np.max(np.abs(expected)))


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name", list(CASES))
def test_every_quantity_matches_the_per_example_loop(name):
  problem = _problem(name)
  model, params, x, y, val_x, val_y = problem
  want = _naive(problem)
  grads = want["grads"]
  reference = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), jnp.shape(a), jnp.float64), params)
  scorer = influence.ghost_scorer(model, LOSS)

  _close(jax.jit(lambda p: persample.grad_norms(model, p, x, y, LOSS))(params), np.linalg.norm(grads, axis=1))
  _close(jax.jit(lambda p, r: persample.grad_dots(model, p, x, y, r, LOSS))(params, reference), grads @ _flat(reference))
  _close(jax.jit(scorer.scores)(params, x, y, val_x, val_y), grads @ want["val_grad"])
  _close(jax.jit(scorer.interactions)(params, x, y), grads @ grads.T)
  stepped = jax.jit(lambda p: contributions.contributions(model, LOSS, p, x, y, val_x, val_y, ETA))(params)
  _close(stepped, want["contributions"])


@functools.cache
def _programs(name: str):
  """Jitted ghost norms, ghost interactions and one-sample gradient of a case, compiled once for every draw."""
  problem = _problem(name)
  model = problem.model
  return (
      jax.jit(lambda p, x, y: persample.grad_norms(model, p, x, y, LOSS)),
      jax.jit(influence.ghost_scorer(model, LOSS).interactions),
      jax.jit(jax.grad(lambda p, x, y: _mean_loss(problem, p, x, y))),
  )


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**20))
def test_norms_and_interactions_match_the_loop_at_any_parameters_and_batch(name, seed):
  problem = _problem(name)
  norms, interactions, grad = _programs(name)
  noise = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(problem.params)))
  params = jax.tree.unflatten(
      jax.tree.structure(problem.params),
      [leaf + 0.3 * jax.random.normal(k, jnp.shape(leaf), jnp.float64) for leaf, k in zip(jax.tree.leaves(problem.params), noise)],
  )
  x, y = _inputs(jax.random.key(seed + 1), BATCH, CASES[name].tokens)
  grads = np.stack([_flat(grad(params, x[i : i + 1], y[i : i + 1])) for i in range(BATCH)])
  _close(norms(params, x, y), np.linalg.norm(grads, axis=1))
  _close(interactions(params, x, y), grads @ grads.T)


@pytest.mark.parametrize("name", list(CASES))
def test_coverage_names_each_leafs_path_and_the_true_reason(name):
  problem = _problem(name)
  report = persample.coverage(problem.model, problem.params, problem.x)
  leaves = set(persample.leaf_names(problem.params))
  expected = CASES[name].fallback
  assert set(report.fallback) == set(expected), report
  assert set(report.ghost) == leaves - set(expected), report
  for leaf, words in expected.items():
    assert words in report.fallback[leaf], (leaf, report.fallback[leaf])
  assert not any("not a parameter of a supported layer" in report.fallback[leaf] for leaf in expected if expected[leaf] != UNSUPPORTED)


def test_a_tied_head_takes_the_ghost_path_only_where_its_use_is_visible():
  nested = persample.coverage(*_problem("tied-nested-apply")[:3])
  attend = persample.coverage(*_problem("tied-attend")[:3])
  assert "wte/embedding" in nested.fallback and "wte/embedding" in attend.ghost
  assert "test_tape_soundness.py:" in nested.fallback["wte/embedding"]  # the model's own line that reads the table
  assert attend.ghost_share == 1.0
