"""Functions as `jax.jit` static arguments that compare by what they compute, not by identity.

A lambda rebuilt by the same code with equal captured values equals the previous one, so passing it
again reuses the compiled program instead of tracing and compiling anew.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

__all__ = ["ByIdentity", "StaticCallable"]


class ByIdentity:
  """Stands for a value that has no value equality (an array, a list): equal only to the same object."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ByIdentity) and other.value is self.value

  def __hash__(self) -> int:
    return id(self.value)


def _global_names(code: types.CodeType) -> set[str]:
  """Every name that `code` or a function nested in it may look up among the globals."""
  names = set(code.co_names)
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      names |= _global_names(const)
  return names


def _function_key(fn: types.FunctionType, memo: dict[int, Any]) -> tuple:
  """What a plain function computes with: its code, defaults, closure contents and the globals it reads."""
  closure = tuple(_cell_key(cell, memo) for cell in fn.__closure__ or ())
  scope = fn.__globals__
  names = sorted(name for name in _global_names(fn.__code__) if name in scope)
  used = tuple((name, _key(scope[name], memo)) for name in names)
  defaults = _key(fn.__defaults__, memo), _items_key(fn.__kwdefaults__ or {}, memo)
  return ("function", fn.__code__, defaults, closure, used)


def _cell_key(cell: types.CellType, memo: dict[int, Any]) -> Any:
  """The key of a closure cell's contents; a cell not yet filled is its own marker."""
  try:
    return _key(cell.cell_contents, memo)
  except ValueError:
    return ("empty cell",)


def _callable_key(value: Any, memo: dict[int, Any]) -> Any:
  """The key of a function, partial, bound method or StaticCallable."""
  if isinstance(value, StaticCallable):
    return _key(value.fn, memo)
  if isinstance(value, types.FunctionType):
    return _function_key(value, memo)
  if isinstance(value, functools.partial):
    func, args = _key(value.func, memo), _key(value.args, memo)
    return ("partial", type(value), func, args, _items_key(value.keywords, memo))
  return ("method", _key(value.__func__, memo), _key(value.__self__, memo))


def _items_key(mapping: dict[str, Any], memo: dict[int, Any]) -> tuple:
  """The key of the keyword arguments a function or partial owns, name by name."""
  return tuple((name, _key(mapping[name], memo)) for name in sorted(mapping))


def _key(value: Any, memo: dict[int, Any]) -> Any:
  """A hashable key equal for values that behave alike: structure for functions and tuples, type and
  value for other hashable values, identity for the rest (arrays, lists, dicts: they may change).

  `memo` maps the id of every function or tuple already met to its key; while one is still being
  keyed it maps to its identity, so a cycle (a recursive function) ends there.
  """
  if id(value) in memo:
    return memo[id(value)]
  if isinstance(value, (StaticCallable, types.FunctionType, functools.partial, types.MethodType)):
    memo[id(value)] = ByIdentity(value)
    memo[id(value)] = _callable_key(value, memo)
    return memo[id(value)]
  if isinstance(value, tuple):
    memo[id(value)] = ByIdentity(value)
    memo[id(value)] = (type(value), tuple(_key(v, memo) for v in value))
    return memo[id(value)]
  try:
    hash(value)
  except TypeError:
    return ByIdentity(value)
  return (type(value), value)


class StaticCallable:
  """`fn` as a static argument for `jax.jit`: calls delegate to `fn`, equality compares what it computes.

  Two StaticCallables are equal when their functions have equal code objects, defaults and closure
  contents, and read equal values from the globals they use, compared recursively: functions,
  `functools.partial` objects (func, args, keywords) and bound methods by the same rule, tuples element
  by element, other hashable values by type and equality (so 2 differs from 2.0), and unhashable values
  such as arrays, lists and dicts by identity. Any other callable compares by its own equality.

  The key is taken when the StaticCallable is made, so wrapping a function again after a global it
  reads was rebound gives an unequal StaticCallable (and a new trace), which plain `jax.jit` misses.
  Mutating a captured list or array in place is not seen, as with `jax.jit`.
  """

  __slots__ = ("fn", "_key", "_hash")

  def __init__(self, fn: Callable[..., Any], *, name: str = "fn"):
    """Wrap `fn` (unwrapping a StaticCallable); `name` is what an error calls it."""
    if not callable(fn):
      raise ValueError(f"{name} must be callable, got {fn!r} of type {type(fn).__name__}")
    self.fn = fn.fn if isinstance(fn, StaticCallable) else fn
    self._key = _key(self.fn, {})
    self._hash = hash(self._key)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.fn(*args, **kwargs)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, StaticCallable):
      return NotImplemented
    return self._hash == other._hash and self._key == other._key

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    return f"StaticCallable({self.fn!r})"
