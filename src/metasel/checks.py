"""Argument checks shared by every module: each raises a ValueError naming the value and what was expected.

They run in Python before any compute, on static settings (sizes, rates, choices), never on traced
values. Modules import this one instead of writing their own, so that the same mistake gets the same
message everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "is_int",
    "check_int",
    "check_float",
    "check_positive",
    "check_range",
    "check_fractions",
    "check_seed",
    "check_choice",
    "check_finite_rows",
]


def is_int(value: Any) -> bool:
  """True for a Python or numpy integer that is not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None, allow_none: bool = False) -> None:
  """Raise unless `value` is an int (not bool) in [minimum, maximum] (or None when allowed)."""
  if value is None and allow_none:
    return
  if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name} must be an integer {bound}{' or None' if allow_none else ''}, got {value!r}")


def check_float(name: str, value: Any, *, minimum: float = 0.0, maximum: float = np.inf) -> None:
  """Raise unless `value` is a real number (not bool) in [minimum, maximum]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not minimum <= value <= maximum:
    raise ValueError(f"{name} must be a number in [{minimum}, {maximum}], got {value!r}")


def check_positive(name: str, value: Any) -> None:
  """Raise unless `value` is a finite real number > 0 (a step size, a temperature, a learning rate)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < np.inf:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_range(name: str, value: Any, *, minimum: float = 0.0) -> None:
  """Raise unless `value` is a pair (low, high) of finite numbers with minimum <= low <= high."""
  ok = isinstance(value, (tuple, list)) and len(value) == 2
  ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in value)
  if not ok or not minimum <= value[0] <= value[1]:
    raise ValueError(f"{name} must be a pair (low, high) with {minimum} <= low <= high, got {value!r}")


def check_fractions(name: str, value: Any, known: Sequence[str]) -> dict[str, float]:
  """A validated mapping of known names to fractions in [0, 1] that add up to at most 1."""
  if not isinstance(value, Mapping):
    raise ValueError(f"{name} must be a mapping of tier name to fraction, got {value!r}")
  unknown = sorted(set(value) - set(known))
  if unknown:
    raise ValueError(f"unknown {name} {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
  for key, fraction in value.items():
    check_float(f"{name}[{key!r}]", fraction, maximum=1.0)
  if sum(value.values()) > 1.0 + 1e-9:
    raise ValueError(f"{name} fractions add up to {sum(value.values()):.3f}; expected at most 1")
  return {key: float(value.get(key, 0.0)) for key in known}


def check_seed(seed: Any) -> None:
  """Raise unless `seed` is a non-negative int."""
  check_int("seed", seed, minimum=0)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raise unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


def check_finite_rows(name: str, values: Any, columns: Sequence[str] = ()) -> None:
  """Raise when a concrete table (N, ...) holds NaN or inf, naming the count, the first row and its column.

  Traced values (inside `jit`) are not checked.
  """
  import jax  # only for the tracer test; this module is imported by the data layer too

  if isinstance(values, jax.core.Tracer):
    return
  values = np.asarray(values, dtype=np.float64)
  bad = ~np.isfinite(values.reshape(values.shape[0], -1)) if values.ndim else ~np.isfinite(values.reshape(1, 1))
  if bad.any():
    row, column = (int(i) for i in np.argwhere(bad)[0])
    label = f", {columns[column]}" if column < len(columns) else (f", column {column}" if values.ndim > 1 else "")
    raise ValueError(
        f"{name}: {int(bad.sum())} NaN or inf values (first: row {row}{label}); expected finite values"
    )
