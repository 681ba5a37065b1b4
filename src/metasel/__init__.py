"""metasel: compiled per-sample gradients, signals and meta-gradients for training-data selection."""

from metasel import data, models, persample, runs, signals, stats, train

__version__ = "0.1.0"

__all__ = ["data", "models", "persample", "runs", "signals", "stats", "train", "__version__"]
