"""The core install (no extras) trains and computes per-sample gradients; a module needing an extra says which."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# What `pip install metasel` leaves out (the experiments extra); None in sys.modules makes each uninstalled.
EXTRA_MODULES = ("scipy", "sklearn", "statsmodels", "tensorflow_datasets", "array_record", "tqdm", "matplotlib")

SCRIPT = textwrap.dedent(
    f"""
    import sys
    for name in {EXTRA_MODULES!r}:
      sys.modules[name] = None

    import jax, jax.numpy as jnp, numpy as np
    from metasel import core, data, influence, models, mts, persample, train

    model = models.MLP((8,), num_outputs=3)
    x = jax.random.normal(jax.random.key(0), (16, 5))
    y = jnp.arange(16) % 3
    params = models.init(model, jax.random.key(1), (5,))
    norms = persample.grad_norms(model, params, x, y, persample.softmax_cross_entropy)
    assert norms.shape == (16,) and bool(jnp.all(norms > 0))
    dataset = data.from_arrays((np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), (np.asarray(x), np.asarray(y)), num_classes=3)
    method = mts.mts(model, persample.softmax_cross_entropy, mts.loss_features(model, persample.softmax_cross_entropy))
    fitted = train.fit(model, dataset, train.TrainConfig(epochs=1, batch_size=8, val_batch_size=8), method)
    assert np.isfinite(fitted.history[-1]["train/loss"])
    assert influence.ghost_scorer(model, persample.softmax_cross_entropy).name == "ghost"
    try:
      import metasel.stats
    except ImportError as error:
      print("STATS:", error)
    """
)


def test_the_core_install_trains_and_names_the_extra_a_module_needs():
  done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "STATS: metasel.stats needs scipy" in done.stdout
  assert "pip install 'metasel[experiments]'" in done.stdout
