"""Optional dependencies: a clear error naming the extra to install when a module needs one that is missing.

The core install (`pip install metasel`) brings what the numerical modules need: jax, flax (with
orbax-checkpoint), optax, chex and numpy. The experiments, data generators and loaders, statistics,
forecasts, plots and progress bars come with `pip install 'metasel[experiments]'`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["require", "load", "missing"]

EXTRA = "experiments"


def require(*modules: str, needed_by: str) -> None:
  """Raise an ImportError naming the extra when any of `modules` is not installed."""
  missing = [name for name in modules if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(
        f"{needed_by} needs {', '.join(missing)}, which the core install leaves out;"
        f" install them with: pip install 'metasel[{EXTRA}]'"
    )


def missing(error: ModuleNotFoundError, *, needed_by: str) -> ImportError:
  """The ImportError to raise for `error`, a module of the extra not found: what needs it and what to install."""
  return ImportError(
      f"{needed_by} needs {error.name}, which the core install leaves out;"
      f" install it with: pip install 'metasel[{EXTRA}]'"
  )


def load(module: str, *, needed_by: str) -> ModuleType:
  """`module`, imported, or the ImportError of `require`."""
  require(module.split(".")[0], needed_by=needed_by)
  return importlib.import_module(module)
