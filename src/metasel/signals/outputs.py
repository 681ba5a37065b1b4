"""Output signals of one forward pass: predictive entropy, probability margin, EL2N, true-class
probability and embedding norm, each (B,) from (B, C) logits or (B, D) embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metasel.signals import _common

__all__ = ["predictive_entropy", "margin", "el2n", "true_class_prob", "embedding_norm"]


def predictive_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of the predictive distribution, H_i = -sum_c p_ic log p_ic with p_i = softmax(logits_i).

  In [0, log C]; classes with probability 0 contribute 0.

  Args:
    logits: (B, C) unnormalised log-probabilities, batch axis 0.

  Returns:
    (B,) entropies in nats.
  """
  _common.check_rank(logits, 2, "logits", "(batch, classes)")
  logp = jax.nn.log_softmax(_common.as_float(logits), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def true_class_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Probability the model gives the labelled class, p_{i, y_i}.

  Args:
    logits: (B, C) logits, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) probabilities in [0, 1].
  """
  _common.check_logits_labels(logits, labels)
  p = jax.nn.softmax(_common.as_float(logits), axis=-1)
  return jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Probability margin: true-class probability minus the largest other class probability.

      m_i = p_{i, y_i} - max_{c != y_i} p_ic,     p_i = softmax(logits_i).

  Measured on probabilities rather than logits (the area-under-the-margin convention), so the value
  lies in [-1, 1] and is comparable across models and training stages; m_i > 0 exactly when the
  sample is classified correctly (up to ties).

  Args:
    logits: (B, C) logits with C >= 2, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) margins in [-1, 1].
  """
  _common.check_logits_labels(logits, labels)
  num_classes = jnp.shape(logits)[1]
  if num_classes < 2:
    raise ValueError(f"margin needs at least 2 classes, got logits of shape {jnp.shape(logits)}")
  p = jax.nn.softmax(_common.as_float(logits), axis=-1)
  is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
  p_true = jnp.sum(jnp.where(is_true, p, 0.0), axis=-1)
  p_other = jnp.max(jnp.where(is_true, -jnp.inf, p), axis=-1)
  return p_true - p_other


def el2n(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Error L2 norm (Paul et al., 2021): ||softmax(logits_i) - onehot(y_i)||_2.

  Args:
    logits: (B, C) logits, batch axis 0.
    labels: (B,) integer labels in [0, C).

  Returns:
    (B,) norms in [0, sqrt(2)].
  """
  _common.check_logits_labels(logits, labels)
  p = jax.nn.softmax(_common.as_float(logits), axis=-1)
  err = p - jax.nn.one_hot(labels, jnp.shape(logits)[1], dtype=p.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(err), axis=-1))


def embedding_norm(embeddings: jax.Array) -> jax.Array:
  """Euclidean norm of each embedding, ||e_i||_2.

  Args:
    embeddings: (B, D) embeddings, batch axis 0.

  Returns:
    (B,) norms.
  """
  _common.check_embeddings(embeddings)
  return jnp.linalg.norm(_common.as_float(embeddings), axis=-1)
