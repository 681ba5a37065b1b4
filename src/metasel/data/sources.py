"""Load any dataset by spec string.

`load("sine" | "mixture" | "digits-synthetic" | "csv:PATH" | "tsv:PATH" | "lines:PATH" | "tfds:NAME")`
returns a `Dataset`, and `load("corrupted:SPEC")` turns the dataset SPEC names into a real+synthetic
mixture with known corruption tiers; every loader checks its options before doing any work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from metasel.checks import check_seed
from metasel.data import synthetic, text
from metasel.data.dataset import Dataset

__all__ = ["SPECS", "load", "keyword_options", "check_options"]

SPECS = (
    "sine", "mixture", "digits-synthetic", "csv:PATH", "tsv:PATH", "lines:PATH", "tfds:NAME", "corrupted:SPEC"
)


def load(spec: str, *, seed: int = 0, **options) -> Dataset:
  """Load the dataset named by `spec` with train/val/test splits, deterministically for `seed`.

  Known specs: "sine", "mixture", "digits-synthetic" (generated, no download), "csv:PATH", "tsv:PATH",
  "lines:PATH" (local text files, TF-IDF features) and "tfds:NAME" (TensorFlow Datasets). `options` go to
  the loader; unknown option names raise a ValueError that lists the accepted ones.
  "corrupted:SPEC" loads the classification dataset SPEC and passes it to `synthetic.corrupted_mixture`:
  the options n_real, n_synthetic and tiers go to `corrupted_mixture`, all others to SPEC's loader, and
  both use `seed`.

  Example: `load("csv:ag_news/test.csv", n_train=1000, n_test=200, n_val=200)`, or
  `load("corrupted:csv:ag_news/test.csv", n_real=300, n_synthetic=900, n_train=1500, n_val=200, n_test=400)`.
  """
  if not isinstance(spec, str):
    raise ValueError(f"dataset spec must be a string, got {spec!r}; known specs: {', '.join(SPECS)}")
  check_seed(seed)
  if spec.startswith("corrupted:"):
    inner = spec.removeprefix("corrupted:")
    if not inner:
      raise ValueError(
          f"dataset spec {spec!r} names no dataset to corrupt; expected corrupted:SPEC, e.g. corrupted:csv:PATH"
      )
    own = {k: options.pop(k) for k in keyword_options(synthetic.corrupted_mixture) if k in options}
    synthetic.check_corrupted_options(**own)
    return synthetic.corrupted_mixture(load(inner, seed=seed, **options), seed=seed, **own)
  generated = {"sine": synthetic.sine, "mixture": synthetic.mixture, "digits-synthetic": synthetic.digits_synthetic}
  if spec in generated:
    fn = generated[spec]
    check_options(spec, fn, options)
    return fn(seed=seed, **options)
  kind, sep, target = spec.partition(":")
  if not sep or kind not in ("csv", "tsv", "lines", "tfds"):
    raise ValueError(f"unknown dataset spec {spec!r}; known specs: {', '.join(SPECS)}")
  if not target:
    raise ValueError(f"dataset spec {spec!r} names no {'dataset' if kind == 'tfds' else 'file'}; expected {kind}:...")
  if kind == "tfds":
    check_options(spec, text.load_tfds, options)
    return text.load_tfds(target, seed=seed, **options)
  fn = text.load_lines if kind == "lines" else text.load_table
  fixed = {} if kind == "lines" else {"delimiter": "," if kind == "csv" else "\t"}
  check_options(spec, fn, options, fixed=tuple(fixed))
  return fn(target, seed=seed, **fixed, **options)


def keyword_options(fn: Callable) -> list[str]:
  """Names of the keyword-only parameters of the loader `fn`, except `seed`."""
  parameters = inspect.signature(fn).parameters.values()
  return [p.name for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name != "seed"]


def check_options(spec: str, fn: Callable, options: Mapping[str, Any], *, fixed: Sequence[str] = ()) -> None:
  """Raise if `options` holds a name that the loader `fn` does not accept (listing the accepted ones)."""
  accepted = [name for name in keyword_options(fn) if name not in fixed]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for {spec!r}; accepted: {', '.join(accepted)}")


