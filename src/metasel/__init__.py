"""metasel: compiled per-sample gradients, signals and meta-gradients for training-data selection.

Every module named in `__all__` is reachable as an attribute (`metasel.persample`, `metasel.mts`, ...) and
is imported on first use, so that importing one piece (say `metasel.mts`) does not import the others it
does not need, such as the training loop. Modules that need the experiments extra (`stats`, `forecast`,
`runs`) say so when it is missing. Implementation helpers (`checks`, `numerics`, `handlers`, `uses`,
`extras`, ...) are importable by their full name and left out of `__all__`.
"""

import importlib

__version__ = "0.1.0"

__all__ = [
    "adapters",
    "contributions",
    "controllers",
    "core",
    "data",
    "dvn",
    "forecast",
    "ghost",
    "gsnr",
    "hypergrad",
    "influence",
    "models",
    "mts",
    "parallel",
    "persample",
    "records",
    "runs",
    "samplers",
    "selection",
    "signals",
    "stats",
    "tape",
    "train",
    "__version__",
]


def __getattr__(name: str):
  if name in __all__ and name != "__version__":
    return importlib.import_module(f"metasel.{name}")
  raise AttributeError(f"module 'metasel' has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
