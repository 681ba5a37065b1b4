"""Ready models written with plain Flax layers, and the model contract every metasel function takes.

`MLP`, `CNN` and the text `Transformer` are ordinary Flax linen modules that return logits; nothing in
them is specific to metasel, which tapes their standard layers from outside (`metasel.tape`). Your own
linen module, NNX module or `apply(params, x)` function works the same way: see `as_model` and `init`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metasel.adapters import Model, ModelLike, as_model, init

__all__ = ["Model", "ModelLike", "as_model", "init", "MLP", "CNN", "Transformer"]


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs, returning logits (B, num_outputs).

  Attributes:
    hidden: widths of the hidden layers, e.g. (128, 128).
    num_outputs: number of classes (logits) or 1 for scalar regression.
    activation: nonlinearity after each hidden layer.
  """

  hidden: Sequence[int] = (128, 128)
  num_outputs: int = 2
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.reshape((x.shape[0], -1))  # (B, D)
    for width in self.hidden:
      h = self.activation(nn.Dense(width)(h))
    return nn.Dense(self.num_outputs)(h)


class CNN(nn.Module):
  """Small convolutional network for images (B, H, W, C): convolution blocks, then dense layers; logits out.

  No normalisation across the batch, so each sample's loss depends on that sample alone, which
  per-sample gradients require.
  """

  channels: Sequence[int] = (16, 32)
  hidden: Sequence[int] = (64,)
  num_outputs: int = 10
  kernel_size: int = 3
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"CNN expects images of shape (batch, height, width, channels), got {x.shape}")
    h = x
    for width in self.channels:
      h = self.activation(nn.Conv(width, (self.kernel_size, self.kernel_size))(h))
      h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    h = h.reshape((h.shape[0], -1))
    for width in self.hidden:
      h = self.activation(nn.Dense(width)(h))
    return nn.Dense(self.num_outputs)(h)


class Transformer(nn.Module):
  """A text classifier on token ids (B, T): token and position embeddings, pre-norm self-attention blocks,
  mean pooling over the tokens that are not padding, and a dense head; logits (B, num_outputs) out.

  Token id `pad_id` marks padding (`metasel.data.text.PAD_ID`, 0): the attention and the pooling skip
  it. With `pad_id=None` the model takes an explicit `mask` (B, T) instead, and refuses a batch without
  one. Built from standard Flax layers only (`Embed`, `LayerNorm`, `MultiHeadDotProductAttention`,
  `Dense`), so every parameter takes metasel's ghost path.

  Attributes:
    vocab_size: number of token ids, padding included (`len(dataset.vocabulary)`).
    num_outputs: classes.
    max_length: longest sequence the position embedding covers.
    width: model width.
    depth: number of blocks.
    heads: attention heads (must divide `width`).
    mlp_ratio: hidden width of each block's MLP, in units of `width`.
    pad_id: the padding id, or None when masks are passed explicitly.
  """

  vocab_size: int
  num_outputs: int
  max_length: int = 128
  width: int = 64
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 2
  pad_id: int | None = 0

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    _check_tokens(tokens, self.max_length)
    if mask is None and self.pad_id is None:
      raise ValueError(
          "this Transformer has no padding id (pad_id=None), so a batch of token ids needs its mask (batch,"
          " length) of real tokens: pass mask=..., or set pad_id to the id that marks padding"
      )
    mask = tokens != self.pad_id if mask is None else mask.astype(bool)  # (B, T)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = nn.Embed(self.vocab_size, self.width, name="tokens")(tokens)
    h = h + nn.Embed(self.max_length, self.width, name="positions")(positions)  # (B, T, width)
    attention_mask = nn.make_attention_mask(mask, mask)  # (B, 1, T, T)
    for _ in range(self.depth):
      attend = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width)
      h = h + attend(nn.LayerNorm()(h), mask=attention_mask)
      hidden = nn.gelu(nn.Dense(self.mlp_ratio * self.width)(nn.LayerNorm()(h)))
      h = h + nn.Dense(self.width)(hidden)
    h = nn.LayerNorm()(h)
    counts = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
    pooled = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1) / counts  # (B, width)
    return nn.Dense(self.num_outputs)(pooled)


def _check_tokens(tokens: jax.Array, max_length: int) -> None:
  """Token ids must be integers (batch, length) no longer than the position embedding."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
        f"Transformer expects integer token ids of shape (batch, length), got {tokens.dtype} of shape"
        f" {tokens.shape}; load text with representation='tokens' (e.g. metasel.data.load('csv:PATH',"
        " representation='tokens'))"
    )
  if tokens.shape[1] > max_length:
    raise ValueError(f"sequences of length {tokens.shape[1]} exceed the Transformer's max_length={max_length}")
