"""Flax models whose dense layers expose what per-sample gradients need.

Every model maps a batch `x` (B, ...) to `(outputs, embedding)`: outputs (B, num_outputs) are logits
(or regression values) and embedding (B, D) is the penultimate representation.

Dense layers are `GhostDense`, and convolutions `GhostConv` (a dense layer over image patches).
They record their input in the `ghost_inputs` collection and add a zero perturbation from the
`ghost_outputs` collection to their output. The gradient of the summed
loss with respect to that perturbation is each sample's loss-to-output gradient d_i, and with the
recorded input a_i the per-sample kernel gradient is the outer product a_i d_i^T; so per-sample norms
and dot products need no (B x P) tensor (the "ghost" identity, see `metasel.persample`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "GHOST_INPUTS",
    "GHOST_OUTPUTS",
    "GHOST_UPDATE",
    "GhostDense",
    "GhostConv",
    "MLP",
    "CNN",
    "init_params",
    "kernel_as_matrix",
    "image_patches",
]

GHOST_INPUTS = "ghost_inputs"
GHOST_OUTPUTS = "ghost_outputs"
GHOST_UPDATE = "ghost_update"


class GhostDense(nn.Module):
  """`y = x @ kernel + bias` for x (B, ..., in), recording x and perturbing y for ghost gradients.

  Axes between the batch and the features are positions sharing the weights (e.g. the pixels of a
  convolution's patches); the per-sample kernel gradient then sums a_t d_t^T over positions t.
  With neither collection passed to `apply` it behaves exactly like `flax.linen.Dense`.
  A `GhostDense` instance must be called once per forward pass (no weight sharing across calls),
  since its recorded input and output gradient describe a single use.

  A `ghost_update` collection with entries "input" a (in,) and "output" delta (out,) applies the
  rank-one change kernel + a delta^T, bias + delta without forming it: x a delta^T costs one product
  with a, and x @ kernel stays shared when the change is vmapped over many samples' updates.
  """

  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 2:
      raise ValueError(
          f"GhostDense expects inputs of shape (batch, ..., features), got shape {x.shape};"
          " add a batch axis first"
      )
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = x @ kernel  # (B, ..., features)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    if self.has_variable(GHOST_UPDATE, "input"):
      delta = self.get_variable(GHOST_UPDATE, "output")  # (features,)
      y = y + (x @ self.get_variable(GHOST_UPDATE, "input"))[..., None] * delta
      if self.use_bias:
        y = y + delta
    self.sow(GHOST_INPUTS, "inputs", x)
    return self.perturb("outputs", y, collection=GHOST_OUTPUTS)


class GhostConv(nn.Module):
  """2-D convolution (NHWC, stride 1, kernel HWIO as in `flax.linen.Conv`) that takes the ghost path.

  The forward pass is the native convolution. When the `ghost_inputs` collection is mutable it also
  records the image patches (B, H', W', C * kh * kw), features ordered (channel, row, column): the
  convolution is a dense layer over those patches, so its per-sample gradients follow the same
  identity as `GhostDense`. Plain training never builds the patches.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"GhostConv expects images of shape (batch, height, width, channels), got {x.shape}")
    _check_padding(self.padding)
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
    numbers = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), self.padding, dimension_numbers=numbers)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    if self.is_mutable_collection(GHOST_INPUTS):
      self.sow(GHOST_INPUTS, "inputs", image_patches(x, self.kernel_size, self.padding))
    return self.perturb("outputs", y, collection=GHOST_OUTPUTS)


def _check_padding(padding: str) -> None:
  """Only stride-1 "SAME" and "VALID" convolutions have patches `image_patches` can build."""
  if padding not in ("SAME", "VALID"):
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def image_patches(x: jax.Array, kernel_size: tuple[int, int], padding: str) -> jax.Array:
  """Stride-1 patches (B, H', W', C * kh * kw) of images x (B, H, W, C), ordered (channel, row, column).

  Built from kh * kw shifted slices, a copy rather than the identity convolution of
  `lax.conv_general_dilated_patches`, which costs a full matrix product per layer on CPU.
  """
  _check_padding(padding)
  kh, kw = kernel_size
  if padding == "SAME":
    x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  shifted = [x[:, r : r + height, c : c + width, :] for r in range(kh) for c in range(kw)]
  patches = jnp.stack(shifted, axis=-1)  # (B, H', W', C, kh * kw)
  return patches.reshape(*patches.shape[:3], -1)


def kernel_as_matrix(kernel: jax.Array) -> jax.Array:
  """A ghost layer's kernel as the (in, out) matrix that multiplies its recorded inputs.

  Dense kernels are already (in, out); convolution kernels (kh, kw, C, F) become (C * kh * kw, F),
  matching the (channel, row, column) order of the patches `GhostConv` records.
  """
  if kernel.ndim == 2:
    return kernel
  kh, kw, channels, features = kernel.shape
  return kernel.transpose(2, 0, 1, 3).reshape(channels * kh * kw, features)


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
  """Small convolutional network for images (B, H, W, C): `GhostConv` blocks, then `GhostDense` layers.

  No normalisation across the batch, so each sample's loss depends on that sample alone, which
  per-sample gradients require. Every layer takes the ghost path in `metasel.persample`.
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
      h = self.activation(GhostConv(width, (self.kernel_size, self.kernel_size))(h))
      h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    h = h.reshape((h.shape[0], -1))
    for width in self.hidden:
      h = self.activation(GhostDense(width)(h))
    return GhostDense(self.num_outputs)(h), h


def init_params(model: nn.Module, key: jax.Array, input_shape: Sequence[int]):
  """Initial parameters of `model` for inputs of per-sample shape `input_shape` (no batch axis)."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  return model.init(key, dummy)["params"]
