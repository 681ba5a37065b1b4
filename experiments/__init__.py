"""metasel's experiments, one module each, with a `get_config(quick)` and a `run(config, out_dir)`.

Installed as the `metasel_experiments` package; run them with `metasel run NAME`.
"""

import importlib

REGISTRY = {
    "gsnr-sweep": "metasel_experiments.gsnr_sweep",
    "mts-benchmark": "metasel_experiments.mts_benchmark",
    "signals-report": "metasel_experiments.signals_report",
}


def get(name: str):
  """The experiment module registered as `name` (e.g. "signals-report")."""
  if name not in REGISTRY:
    raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(REGISTRY)}")
  return importlib.import_module(REGISTRY[name])
