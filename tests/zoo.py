"""Models as users write them, for the any-model tests: plain linen, NNX, a pure function, and one that falls back.

`ZOO` maps a name to a `Case`: the model, its params, a batch (x, y) with 3 classes, and which parameters the
ghost path should cover. Each case's naive per-example loop (`naive`) is the reference the tests compare with.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metasel import models, persample

BATCH = 6
CLASSES = 3


class LinenMLP(nn.Module):
  """A plain-linen MLP of nn.Dense layers that returns logits only."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x))
    h = nn.relu(nn.Dense(8)(h))
    return nn.Dense(CLASSES)(h)


class LinenMLPWithEmbedding(nn.Module):
  """The same MLP returning (logits, embedding): the embedding a logits-only model's tape should find."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x))
    h = nn.relu(nn.Dense(8)(h))
    return nn.Dense(CLASSES)(h), h


class LinenCNN(nn.Module):
  """A plain-linen CNN with a stride-2, a dilated and a circular convolution, then a dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    h = nn.relu(nn.Conv(5, (3, 3), kernel_dilation=2, padding="VALID")(h))
    h = nn.relu(nn.Conv(3, (2, 2), padding="CIRCULAR")(h))
    return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


class NNXMLP(nnx.Module):
  """An NNX MLP: nnx.Linear layers with an nnx.LayerNorm."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(10, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.out = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


class GroupedConvNet(nn.Module):
  """A grouped convolution (not taped: it falls back) and a raw parameter under a dense head."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2)(x))
    h = h * self.param("gate", nn.initializers.ones, (4,))
    return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


def pure_function(params, x):
  """A model written as a function of its params, returning (logits, embedding): no Flax layer, so every
  parameter falls back."""
  hidden = jnp.tanh(x @ params["w"] + params["b"])
  return hidden @ params["v"], hidden


class Case(NamedTuple):
  model: Any
  params: Any
  x: jax.Array
  y: jax.Array
  ghost: frozenset[str]  # parameters the ghost path should cover; the others should fall back


def _cases() -> dict[str, Case]:
  keys = jax.random.split(jax.random.key(0), 8)
  y = jax.random.randint(keys[0], (BATCH,), 0, CLASSES)
  x_flat = jax.random.normal(keys[1], (BATCH, 10))
  x_img = jax.random.normal(keys[2], (BATCH, 9, 9, 2))
  lengths = jnp.array([6, 4, 1, 6, 3, 5])[:, None]
  tokens = jnp.where(jnp.arange(6) < lengths, jax.random.randint(keys[3], (BATCH, 6), 2, 30), 0)
  tokens = tokens.at[:, 1].set(tokens[:, 0])  # repeated ids within a sample: their table rows add up

  mlp, cnn, grouped = LinenMLP(), LinenCNN(), GroupedConvNet()
  transformer = models.Transformer(vocab_size=30, num_outputs=CLASSES, max_length=6, width=8, depth=1, heads=2)
  nnx_mlp = NNXMLP(nnx.Rngs(1))
  fn_params = {
      "w": 0.5 * jax.random.normal(keys[4], (10, 5)), "b": jnp.zeros(5), "v": jax.random.normal(keys[5], (5, CLASSES)),
  }

  def init(model, x):
    return models.init(model, keys[6], x.shape[1:], x.dtype)

  def all_of(params):
    return frozenset(persample.leaf_names(params))

  cases = {
      "linen-mlp": Case(mlp, init(mlp, x_flat), x_flat, y, None),
      "linen-cnn": Case(cnn, init(cnn, x_img), x_img, y, None),
      "transformer": Case(transformer, init(transformer, tokens), tokens, y, None),
      "nnx-mlp": Case(nnx_mlp, init(nnx_mlp, x_flat), x_flat, y, None),
      "function": Case(pure_function, fn_params, x_flat, y, frozenset()),
      "grouped-conv": Case(grouped, init(grouped, x_img), x_img, y, frozenset({"Dense_0/kernel", "Dense_0/bias"})),
  }
  return {name: c._replace(ghost=all_of(c.params) if c.ghost is None else c.ghost) for name, c in cases.items()}


ZOO = _cases()
NAMES = list(ZOO)
LOSS = persample.softmax_cross_entropy


def flat(tree) -> np.ndarray:
  """A pytree's leaves, flattened and joined, in `jax.tree.leaves` order."""
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@functools.cache
def naive(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-example Python loop: each sample's loss (B,) and flat gradient (B, P), one sample at a time."""
  case = ZOO[name]
  one_sample = jax.jit(jax.value_and_grad(lambda p, x_i, y_i: persample.losses(case.model, p, x_i, y_i, LOSS)[0]))
  losses, grads = [], []
  for i in range(case.x.shape[0]):
    loss, grad = one_sample(case.params, case.x[i : i + 1], case.y[i : i + 1])
    losses.append(float(loss))
    grads.append(flat(grad))
  return np.array(losses), np.stack(grads)


def close(actual, expected, rtol: float = 1e-5) -> None:
  """Equal to `rtol` relative, with an absolute floor of `rtol` times the largest expected magnitude."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))
