"""The training run the multi-process test repeats in one process (shared by the worker and the test)."""

from __future__ import annotations

from metasel import data, models, mts, persample, train

MODEL = models.MLP((16,), num_outputs=4)
LOSS = persample.softmax_cross_entropy
CONFIG = train.TrainConfig(epochs=2, batch_size=32, val_batch_size=16, learning_rate=3e-3, seed=1)


def dataset():
  return data.load("mixture", seed=0, n_real=64, n_synthetic=192, n_val=64, n_test=64)


def method():
  return mts.mts(MODEL, LOSS, mts.loss_features(MODEL, LOSS), meta_net=mts.MetaNet(hidden=(8,)))
