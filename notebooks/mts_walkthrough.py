# %% [markdown]
# # Meta-learned data weights in metasel: a walkthrough
#
# Runs as a script or as a notebook (jupytext percent format). It checks the one-step hypergradient
# against its closed form, measures how the GSNR of the meta-gradient grows with the batch size, and
# trains an MLP on the generated `mixture` data with uniform batches, L2RW, Meta-Weight-Net and MTS.
# Set `METASEL_QUICK=1` for the tiny setting the tests use.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metasel import core, data, gsnr, models, mts, persample, stats, train

QUICK = os.environ.get("METASEL_QUICK") == "1"
sizes = {"n_real": 200, "n_synthetic": 400, "n_val": 100, "n_test": 100} if QUICK else {}
dataset = data.load("mixture", seed=0, **sizes)
model = models.MLP((64, 64), num_outputs=dataset.num_classes)
loss_fn = train.loss_fn_for(dataset)
params = models.init(model, jax.random.key(0), dataset.input_shape)
x, y = jnp.asarray(dataset.train.x[:64]), jnp.asarray(dataset.train.y[:64])
val_x, val_y = jnp.asarray(dataset.val.x[:64]), jnp.asarray(dataset.val.y[:64])

# %% [markdown]
# ## The hypergradient of one SGD step
# With weights w_i and one step theta' = theta - lr sum_i w_i grad l_i(theta), the validation loss changes
# with each weight as d L_val(theta') / d w_i = -lr <grad L_val(theta'), grad l_i(theta)>. `mts.hypergrad`
# differentiates through the step; `persample.grad_dots` gives the closed form through the ghost identity.

# %%
lr = 0.1
per_sample_loss = lambda p, xb, yb: persample.losses(model, p, xb, yb, loss_fn)
outer = lambda p: jnp.mean(per_sample_loss(p, val_x, val_y))
uniform_weights = jnp.full((1, 64), 1 / 64)
hg = jax.jit(lambda w: mts.hypergrad(
    lambda w: w, w, outer, per_sample_loss, optax.sgd, params, optax.sgd(lr).init(params), (x[None], y[None]), lr
))(uniform_weights)
closed_form = -lr * persample.grad_dots(model, params, x, y, jax.grad(outer)(hg.params), loss_fn)
print("max |autodiff - closed form|:", float(jnp.max(jnp.abs(hg.grads[0] - closed_form))))

# %% [markdown]
# ## GSNR of the meta-gradient against the batch size
# A meta-network maps each sample's loss to a weight; its hypergradient is measured over many batches
# of each size, in one compiled program per size.

# %%
meta_net = mts.MetaNet(hidden=(32,))
loss_only = mts.loss_features(model, loss_fn)
meta_params = mts.init_meta_net(meta_net, jax.random.key(1), loss_only.width)


def meta_grad(both, batch):
  model_params, phi = both
  bx, by = batch
  ctx = core.StepContext(model_params, core.Batch(jnp.zeros_like(by), bx, by), val_x, val_y, jax.random.key(0))
  inputs = mts.meta_inputs(loss_only, meta_net, ctx)
  weigh = lambda phi: mts.meta_weights(meta_net, phi, inputs)
  return mts.batch_hypergrad(model, loss_fn, weigh, phi, ctx, inner_learning_rate=lr).grads


batch_sizes = (8, 32, 128) if QUICK else (8, 32, 128, 512)
pool = (jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y))
results = gsnr.sweep(meta_grad, (params, meta_params), pool, batch_sizes, num_batches=8 if QUICK else 32, key=jax.random.key(2))
for b, g in results.items():
  print(f"batch {b:4d}: aggregate GSNR {float(g.aggregate):.3f}, median per-parameter GSNR {float(g.median):.4f}")

# %% [markdown]
# ## Training with each method
# Every method is a `core.Method`, so `train.fit` runs them all the same way. The AUC of MTS's learned
# weights against the true corrupt tier says whether it found the bad data (above 0.5: lower weight on
# corrupt samples).

# %%
config = train.TrainConfig(epochs=2 if QUICK else 10, batch_size=64, val_batch_size=64, learning_rate=3e-3)
features = mts.concat_features(mts.loss_features(model, loss_fn), mts.position_features(model, loss_fn, dataset.num_classes))
methods = {
    "uniform": core.uniform(),
    "l2rw": mts.l2rw(model, loss_fn),
    "mwn": mts.mwn(model, loss_fn),
    "mts": mts.mts(model, loss_fn, features, meta_net=mts.MetaNet(num_classes=dataset.num_classes, num_groups=2)),
}
fits = {name: train.fit(model, dataset, config, method) for name, method in methods.items()}
for name, fit in fits.items():
  print(f"{name:8s} test accuracy {fit.history[-1]['test/accuracy']:.3f}")

fit = fits["mts"]
train_x, train_y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
ctx = core.StepContext(
    fit.state.params, core.Batch(jnp.arange(len(train_y)), train_x, train_y, jnp.asarray(dataset.train.groups)),
    jnp.asarray(dataset.val.x), jnp.asarray(dataset.val.y), jax.random.key(3),
)
weights = methods["mts"].weights(fit.state.method_state, ctx)[0]
corrupt = dataset.train.tier != data.CLEAN_TIER
print("AUC of low MTS weight against corrupt:", round(stats.auc(-np.asarray(weights), corrupt), 3))
