"""Records made from their settings: equal settings give equal, hashable records and one compiled program.

A method, a feature set or a scorer is a `Recipe`: the function that builds it and the settings it was
built with. Its functions (`weights`, `update`, ...) are those `build(**settings)` returns, so two
recipes with equal settings compute the same and compare equal. A recipe is a pytree: arrays among its
settings (a per-run table, mask or order) are its leaves and everything else its static structure, so
a program that takes it as an argument traces the arrays as inputs (never constants baked into the
program) and compiles once for every recipe of the same structure.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["Recipe", "recipe", "valued", "built_of", "partition", "combine"]

F = TypeVar("F", bound=Callable[..., Any])


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray))


def partition(tree: Any) -> tuple[list[Any], tuple]:
  """A pytree's array leaves and a hashable key of everything else (its structure and other leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [leaf for leaf in leaves if _is_array(leaf)]
  static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
  mask = tuple(_is_array(leaf) for leaf in leaves)
  return arrays, (treedef, static, mask)


def combine(arrays: list[Any], key: tuple) -> Any:
  """The pytree `partition` split into `arrays` and `key`."""
  treedef, static, mask = key
  given = iter(arrays)
  return jax.tree.unflatten(treedef, [next(given) if is_array else leaf for leaf, is_array in zip(static, mask)])


@jax.tree_util.register_pytree_node_class
class Recipe:
  """The record `build` returns for `settings` (its arguments by name), compared and hashed by both.

  Attribute reads and calls go to the built record (built once per recipe). Settings must be hashable
  apart from their arrays (numbers, strings, tuples, functions, models, other recipes); arrays are
  compared by value and are the recipe's pytree leaves.
  """

  __slots__ = ("build", "settings", "_key", "_built")

  def __init__(self, build: Callable[..., Any], settings: dict[str, Any]):
    object.__setattr__(self, "build", build)
    object.__setattr__(self, "settings", dict(settings))
    arrays, key = partition(self.settings)
    try:
      hash(key)
    except TypeError as err:
      raise ValueError(f"the settings of {build.__qualname__} must be hashable apart from their arrays: {err}") from None
    object.__setattr__(self, "_key", key)
    object.__setattr__(self, "_built", None)

  def built(self) -> Any:
    """The record `build` makes from the settings, built on first use."""
    if self._built is None:
      bound = inspect.BoundArguments(inspect.signature(self.build), self.settings)
      object.__setattr__(self, "_built", self.build(*bound.args, **bound.kwargs))
    return self._built

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.built()(*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.built(), name)

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f"a {type(self).__name__} is immutable; build another with other settings")

  def __copy__(self) -> Recipe:
    return self  # immutable

  def __deepcopy__(self, memo) -> Recipe:
    return self

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Recipe):
      return NotImplemented
    if (self.build, self._key) != (other.build, other._key):
      return False
    mine, theirs = partition(self.settings)[0], partition(other.settings)[0]
    return all(a is b or np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mine, theirs))

  def __hash__(self) -> int:
    return hash((self.build, self._key))

  def __repr__(self) -> str:
    shown = ", ".join(f"{k}={_short(v)}" for k, v in self.settings.items())
    return f"{self.build.__qualname__.lstrip('_')}({shown})"

  def tree_flatten(self):
    arrays, key = partition(self.settings)
    return arrays, (self.build, key)

  @classmethod
  def tree_unflatten(cls, aux, arrays):
    build, key = aux
    made = object.__new__(cls)
    for name, value in (("build", build), ("settings", combine(list(arrays), key)), ("_key", key), ("_built", None)):
      object.__setattr__(made, name, value)
    return made


def _short(value: Any) -> str:
  if _is_array(value):
    return f"array{tuple(np.shape(value))}"
  return repr(value)


def built_of(value: Any) -> Any:
  """The record a `Recipe` stands for; any other value as it is."""
  return value.built() if isinstance(value, Recipe) else value


def recipe(build: Callable[..., Any], **settings: Any) -> Recipe:
  """`Recipe(build, settings)`: the record `build(**settings)`, equal to every other built with equal settings."""
  return Recipe(build, settings)


def valued(factory: F) -> F:
  """`factory` returning a `Recipe` of itself: its record, built (and its arguments checked) at once, and
  equal to the record of every other call with equal arguments (defaults filled in).

  A `model` argument is taken through `adapters.as_model` first, so a module and its `Model` give
  one record. The factory must not read the values of its array arguments outside `jnp` operations:
  a program given the record as an argument rebuilds it from traced arrays.
  """
  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def make(*args: Any, **kwargs: Any) -> Recipe:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    if "model" in bound.arguments and bound.arguments["model"] is not None:
      from metasel import adapters  # records sit below the model floor; the model floor imports no records

      bound.arguments["model"] = adapters.as_model(bound.arguments["model"])
    made = Recipe(factory, dict(bound.arguments))
    made.built()
    return made

  make.__wrapped_factory__ = factory
  return make  # type: ignore[return-value]
