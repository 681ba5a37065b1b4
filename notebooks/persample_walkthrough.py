# %% [markdown]
# # Per-sample gradients in metasel: a walkthrough
#
# Runs as a script or as a notebook (jupytext percent format). It trains a small MLP written with plain
# Flax layers on the generated `mixture` data, then computes per-sample gradient norms and dot products
# with a validation gradient through the ghost identity, checks them against the plain `vmap` path, and
# asks how well each separates corrupted from clean samples. Set `METASEL_QUICK=1` for the tiny setting
# the tests use.

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metasel import data, persample, stats, train

QUICK = os.environ.get("METASEL_QUICK") == "1"
sizes = {"n_real": 200, "n_synthetic": 400, "n_val": 100, "n_test": 100} if QUICK else {}
dataset = data.load("mixture", seed=0, **sizes)
print(dataset.name, "train", dataset.train.x.shape, "classes", dataset.num_classes, "tiers", dataset.tier_names)

# %% [markdown]
# ## Your own model, trained with uniform batches
# Any Flax linen module (returning logits, or `(logits, embedding)`), Flax NNX module or `apply(params, x)`
# function works. `train.fit` runs each epoch as one compiled `lax.scan`; it returns the final state and a
# history.

# %%
class Classifier(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(64)(x))
    h = nn.relu(nn.Dense(64)(h))
    return nn.Dense(self.num_classes)(h)


model = Classifier(dataset.num_classes)
config = train.TrainConfig(epochs=2 if QUICK else 10, batch_size=32, val_batch_size=32, learning_rate=3e-3)
result = train.fit(model, dataset, config)
print({k: round(v, 4) for k, v in result.history[-1].items() if k.startswith("test/")})
params = result.state.params

# %% [markdown]
# ## Per-sample gradient norms and validation alignment
# The ghost path never forms the (B x P) per-sample gradients; the vmap path does, chunk by chunk.
# `persample.coverage` says which parameters the ghost path covers (here: all of them, as every layer is
# a standard `nn.Dense`).

# %%
loss_fn = train.loss_fn_for(dataset)
x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
print(persample.coverage(model, params, x[:8]))
val_grad = jax.grad(lambda p: jnp.mean(persample.losses(model, p, jnp.asarray(dataset.val.x), jnp.asarray(dataset.val.y), loss_fn)))(params)

ghost_norms = jax.jit(lambda p: persample.grad_norms(model, p, x, y, loss_fn))(params)
vmap_norms = jax.jit(lambda p: persample.grad_norms(model, p, x, y, loss_fn, method="vmap", chunk_size=128))(params)
alignment = jax.jit(lambda p, g: persample.grad_dots(model, p, x, y, g, loss_fn))(params, val_grad)
print("max relative difference ghost vs vmap:", float(jnp.max(jnp.abs(ghost_norms - vmap_norms) / vmap_norms)))

# %% [markdown]
# ## Do the signals find the corrupted samples?
# AUC 0.5 means no information. Samples whose gradient points against the clean validation gradient
# (negative alignment) are the ones one SGD step on them would make worse.

# %%
corrupt = dataset.train.tier != data.CLEAN_TIER
print("AUC(grad norm -> corrupt):", round(stats.auc(np.asarray(ghost_norms), corrupt), 3))
print("AUC(-alignment -> corrupt):", round(stats.auc(-np.asarray(alignment), corrupt), 3))

# %% [markdown]
# ## The same with a Flax NNX model
# An NNX module carries its own parameters; `train.fit` starts from them.

# %%
class NNXClassifier(nnx.Module):
  def __init__(self, num_features, num_classes, rngs):
    self.hidden = nnx.Linear(num_features, 64, rngs=rngs)
    self.out = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


nnx_model = NNXClassifier(x.shape[1], dataset.num_classes, nnx.Rngs(0))
nnx_fit = train.fit(nnx_model, dataset, config)
nnx_norms = persample.grad_norms(nnx_model, nnx_fit.state.params, x[:256], y[:256], loss_fn)
print("NNX test accuracy:", round(nnx_fit.history[-1]["test/accuracy"], 3), "mean grad norm:", float(nnx_norms.mean()))
