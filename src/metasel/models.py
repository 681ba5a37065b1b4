"""Flax models whose dense layers expose what per-sample gradients need.

Every model maps a batch `x` (B, ...) to `(outputs, embedding)`: outputs (B, num_outputs) are logits
(or regression values) and embedding (B, D) is the penultimate representation.

Dense layers are `GhostDense`: they record their input in the `ghost_inputs` collection and add a
zero perturbation from the `ghost_outputs` collection to their output. The gradient of the summed
loss with respect to that perturbation is each sample's loss-to-output gradient d_i, and with the
recorded input a_i the per-sample kernel gradient is the outer product a_i d_i^T; so per-sample norms
and dot products need no (B x P) tensor (the "ghost" identity, see `metasel.persample`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GHOST_INPUTS", "GHOST_OUTPUTS", "GhostDense", "MLP", "CNN", "init_params"]

GHOST_INPUTS = "ghost_inputs"
GHOST_OUTPUTS = "ghost_outputs"


class GhostDense(nn.Module):
  """`y = x @ kernel + bias` for x (B, in), recording x and perturbing y for ghost gradients.

  With neither collection passed to `apply` it behaves exactly like `flax.linen.Dense`.
  A `GhostDense` instance must be called once per forward pass (no weight sharing), since its
  recorded input and output gradient describe a single use.
  """

  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(
          f"GhostDense expects inputs of shape (batch, features), got shape {x.shape};"
          " flatten the input first"
      )
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = x @ kernel  # (B, features)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    self.sow(GHOST_INPUTS, "inputs", x)
    return self.perturb("outputs", y, collection=GHOST_OUTPUTS)


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs; every layer is a `GhostDense`.

  Attributes:
    hidden: widths of the hidden layers, e.g. (128, 128).
    num_outputs: number of classes (logits) or 1 for scalar regression.
    activation: nonlinearity after each hidden layer.
  """

  hidden: Sequence[int] = (128, 128)
  num_outputs: int = 2
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x.reshape((x.shape[0], -1))  # (B, D)
    for width in self.hidden:
      h = self.activation(GhostDense(width)(h))
    return GhostDense(self.num_outputs)(h), h


class CNN(nn.Module):
  """Small convolutional network for images (B, H, W, C): conv blocks, then `GhostDense` layers.

  Convolutions use no normalisation across the batch, so each sample's loss depends on that sample
  alone, which per-sample gradients require. Convolution parameters are not ghost layers: their
  per-sample gradients come from a chunked `vmap` (see `metasel.persample`).
  """

  channels: Sequence[int] = (16, 32)
  hidden: Sequence[int] = (64,)
  num_outputs: int = 10
  kernel_size: int = 3
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f"CNN expects images of shape (batch, height, width, channels), got {x.shape}")
    h = x
    for width in self.channels:
      h = self.activation(nn.Conv(width, (self.kernel_size, self.kernel_size))(h))
      h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    h = h.reshape((h.shape[0], -1))
    for width in self.hidden:
      h = self.activation(GhostDense(width)(h))
    return GhostDense(self.num_outputs)(h), h


def init_params(model: nn.Module, key: jax.Array, input_shape: Sequence[int]):
  """Initial parameters of `model` for inputs of per-sample shape `input_shape` (no batch axis)."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  return model.init(key, dummy)["params"]
