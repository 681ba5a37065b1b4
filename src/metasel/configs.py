"""Command-line overrides of frozen config dataclasses: `key.path=value` strings typed by the annotations.

`metasel run NAME --set warmup.epochs=2 --set dataset_options.n_real=200` turns each `--set` into a new
config with `apply_overrides`. A value is parsed by the annotation of the field it sets: int, float,
bool, str, `X | None`, `tuple[T, ...]` (comma-separated or a JSON list), nested dataclasses (set their
fields with a dotted path) and `dict` fields (the rest of the path names dict keys; values are JSON
literals, or plain strings when they are not JSON).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_override", "apply_overrides"]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")
_SUPPORTED = "int, float, bool, str, X | None, tuple[T, ...], tuple[T1, T2], dict or a dataclass"


def parse_override(text: str) -> tuple[tuple[str, ...], str]:
  """Split "a.b.c=value" into (("a", "b", "c"), "value"); the value is everything after the first "="."""
  if not isinstance(text, str):
    raise ValueError(f"an override must be a string KEY=VALUE, got {text!r}")
  key, sep, value = text.partition("=")
  if not sep:
    raise ValueError(f"override {text!r} has no '='; expected KEY=VALUE, e.g. epochs=3 or warmup.epochs=3")
  parts = tuple(part.strip() for part in key.split("."))
  if not all(parts):
    raise ValueError(
        f"override {text!r} has an empty key part in {key!r}; expected dot-separated names, e.g. warmup.epochs"
    )
  return parts, value


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
  """A new config with each "key.path=value" of `overrides` applied in order (later ones win)."""
  if isinstance(overrides, str):
    raise ValueError(f"overrides must be a sequence of KEY=VALUE strings, got the single string {overrides!r}")
  _check_dataclass(config)
  for text in overrides:
    keys, value = parse_override(text)
    config = _set_field(config, keys, value, prefix="")
  return config


def _check_dataclass(config: Any) -> None:
  """Raise unless `config` is a dataclass instance (overrides replace its fields)."""
  if not dataclasses.is_dataclass(config) or isinstance(config, type):
    raise ValueError(f"overrides apply to a dataclass config instance, got {type(config).__name__}")


def _field_types(cls: type) -> dict[str, Any]:
  """Field name -> resolved annotation; string annotations are evaluated in their class's module."""
  try:
    return typing.get_type_hints(cls)  # each base's annotations in that base's module
  except Exception:  # some annotation cannot be evaluated: resolve the others one by one
    hints = {}
    for base in reversed(cls.__mro__):
      module = sys.modules.get(base.__module__)
      namespace = dict(vars(module)) if module else {}
      for name, annotation in vars(base).get("__annotations__", {}).items():
        hints[name] = _resolve(annotation, namespace)
    return hints


def _resolve(annotation: Any, namespace: dict) -> Any:
  """A string annotation evaluated in `namespace`, or left as the string when it cannot be."""
  if not isinstance(annotation, str):
    return annotation
  try:
    return eval(annotation, namespace)  # as typing.get_type_hints evaluates annotations
  except Exception:
    return annotation


def _set_field(config: Any, keys: tuple[str, ...], text: str, prefix: str) -> Any:
  """`config` with the field `keys[0]` (below `keys[1:]` for nested fields) set from `text`."""
  fields = {f.name: f for f in dataclasses.fields(config) if f.init}
  name, rest = keys[0], keys[1:]
  path = prefix + name
  if name not in fields:
    raise ValueError(
        f"unknown setting {path!r}: {type(config).__name__} has no field {name!r};"
        f" expected one of {', '.join(sorted(fields))}"
    )
  annotation = _field_types(type(config)).get(name, fields[name].type)
  current = getattr(config, name)
  if isinstance(annotation, str) and dataclasses.is_dataclass(current):
    annotation = type(current)  # an unresolvable name whose value shows the nested config's class
  value = _new_value(annotation, current, rest, text, path)
  return dataclasses.replace(config, **{name: value})


def _new_value(annotation: Any, current: Any, rest: tuple[str, ...], text: str, path: str) -> Any:
  """The field's new value: recurse into a dataclass, set a dict entry, or parse a scalar or tuple."""
  members, optional = _union_members(annotation)
  if optional and not rest and text.strip().lower() in _NONE_WORDS:
    return None
  nested = next((m for m in members if _is_dataclass_type(m)), None)
  if nested is not None:
    return _set_nested(nested, current, rest, text, path)
  if any(_is_dict_type(m) for m in members):
    return _set_dict(current, rest, text, path)
  if rest:
    raise ValueError(
        f"cannot set {path + '.' + '.'.join(rest)!r}: {path} is a {_type_name(annotation)} field, not a"
        " dataclass or dict; expected a path that ends at it"
    )
  return _parse(annotation, text, path)


def _set_nested(cls: type, current: Any, rest: tuple[str, ...], text: str, path: str) -> Any:
  """A nested dataclass field: set one of its fields; the whole field cannot be given as text."""
  names = [f"{path}.{f.name}" for f in dataclasses.fields(cls) if f.init]
  if not rest:
    raise ValueError(
        f"{path} is a {cls.__name__} and cannot be set from {text!r}; set its fields instead:"
        f" {', '.join(names)}"
    )
  if not dataclasses.is_dataclass(current) or isinstance(current, type):
    raise ValueError(f"cannot set {path}.{'.'.join(rest)}: {path} is {current!r}, not a {cls.__name__}")
  return _set_field(current, rest, text, prefix=path + ".")


def _set_dict(current: Any, rest: tuple[str, ...], text: str, path: str) -> dict:
  """A dict field: replace it by a JSON object, or set the entry at the key path `rest` (a copy)."""
  if not rest:
    value = _json_or_none(text)
    if not isinstance(value, dict):
      raise ValueError(f"{path} expects a JSON object such as '{{\"n_real\": 200}}', got {text!r}")
    return value
  if current is None:
    current = {}
  if not isinstance(current, dict):
    raise ValueError(f"cannot set {path}.{'.'.join(rest)}: {path} is {current!r}, not a dict")
  return _set_entry(current, rest, _json_or_text(text), path)


def _set_entry(mapping: dict, keys: tuple[str, ...], value: Any, path: str) -> dict:
  """A copy of `mapping` with `value` at the key path `keys`, creating (copied) nested dicts as needed."""
  key, rest = keys[0], keys[1:]
  if not rest:
    return {**mapping, key: value}
  inner = mapping.get(key, {})
  if not isinstance(inner, dict):
    raise ValueError(
        f"cannot set {path}.{key}.{'.'.join(rest)}: {path}.{key} is {inner!r}, not a dict; expected a"
        " path through dicts"
    )
  return {**mapping, key: _set_entry(inner, rest, value, f"{path}.{key}")}


def _json_or_none(text: str) -> Any:
  """`text` as a JSON value, or None when it is not JSON."""
  try:
    return json.loads(text)
  except ValueError:
    return None


def _json_or_text(text: str) -> Any:
  """`text` as a JSON literal (200, 0.5, true, null, [1, 2], {"a": 1}) when it is one, else the string."""
  try:
    return json.loads(text)
  except ValueError:
    return text


def _parse(annotation: Any, text: str, path: str) -> Any:
  """The value of `text` for a field of type `annotation` (a scalar, union or tuple type)."""
  members, optional = _union_members(annotation)
  if optional or len(members) > 1:
    return _parse_union(annotation, members, optional, text, path)
  if annotation in _SCALARS:
    return _SCALARS[annotation](text, path)
  if typing.get_origin(annotation) is tuple:
    return _parse_tuple(annotation, text, path)
  if isinstance(annotation, str):
    raise ValueError(
        f"{path} has the annotation {annotation!r}, which does not name a type in its module, so it cannot be"
        " set from the command line; expected an importable type"
    )
  raise ValueError(
      f"{path} has type {_type_name(annotation)}, which cannot be set from the command line;"
      f" supported types are {_SUPPORTED}"
  )


def _parse_union(annotation: Any, members: list, optional: bool, text: str, path: str) -> Any:
  """Parse as the supported members in order (the first that accepts `text` wins); none/null -> None."""
  if optional and text.strip().lower() in _NONE_WORDS:
    return None
  candidates = [m for m in members if _is_parseable(m)]
  if not candidates:
    raise ValueError(
        f"{path} has type {_type_name(annotation)}, which cannot be set from the command line;"
        f" supported types are {_SUPPORTED}"
    )
  errors = []
  for member in candidates:
    try:
      return _parse(member, text, path)
    except ValueError as err:
      errors.append(err)
  if len(errors) == 1:
    raise errors[0]
  expected = " or ".join(_type_name(m) for m in candidates) + (" or none" if optional else "")
  raise ValueError(f"{path} expects {expected}, got {text!r}")


def _parse_tuple(annotation: Any, text: str, path: str) -> tuple:
  """A tuple from "a,b,c" or a JSON list "[a, b]", each element parsed as its annotated type."""
  args = typing.get_args(annotation)
  if not args:
    raise ValueError(f"{path} has type tuple without element types; expected tuple[T, ...] or tuple[T1, T2]")
  items = _split_items(text, path)
  if len(args) == 2 and args[1] is Ellipsis:
    return tuple(_parse(args[0], item, f"{path}[{i}]") for i, item in enumerate(items))
  if args == ((),):  # tuple[()] is the empty tuple
    args = ()
  if len(items) != len(args):
    raise ValueError(f"{path} expects {len(args)} values ({_type_name(annotation)}), got {len(items)} in {text!r}")
  return tuple(_parse(arg, item, f"{path}[{i}]") for i, (arg, item) in enumerate(zip(args, items)))


def _split_items(text: str, path: str) -> list[str]:
  """The element texts of a tuple value: a JSON list's elements, or the comma-separated parts."""
  stripped = text.strip()
  if not stripped:
    return []
  if stripped.startswith("["):
    values = _json_or_none(stripped)
    if not isinstance(values, list):
      raise ValueError(f"{path} expects comma-separated values or a JSON list, got {text!r} (not a valid JSON list)")
    return [v if isinstance(v, str) else json.dumps(v) for v in values]
  items = [item.strip() for item in stripped.split(",")]
  if not all(items):
    raise ValueError(f"{path} expects comma-separated values such as '16,32,64', got an empty element in {text!r}")
  return items


def _parse_int(text: str, path: str) -> int:
  """An int from decimal text such as "3" or "-2"; "3.5" and "abc" are errors."""
  try:
    return int(text.strip())
  except ValueError:
    raise ValueError(f"{path} expects an int, got {text!r}") from None


def _parse_float(text: str, path: str) -> float:
  """A float from Python float syntax: "0.5", "3", "1e-3", "inf"."""
  try:
    return float(text.strip())
  except ValueError:
    raise ValueError(f"{path} expects a float, got {text!r}") from None


def _parse_bool(text: str, path: str) -> bool:
  """A bool from true/false, 1/0 or yes/no, in any case."""
  word = text.strip().lower()
  if word in _TRUE_WORDS:
    return True
  if word in _FALSE_WORDS:
    return False
  raise ValueError(f"{path} expects a bool (true/false, 1/0, yes/no), got {text!r}")


def _parse_str(text: str, path: str) -> str:
  """The text as given."""
  del path
  return text


_SCALARS = {int: _parse_int, float: _parse_float, bool: _parse_bool, str: _parse_str}


def _union_members(annotation: Any) -> tuple[list, bool]:
  """The non-None members of a union annotation (or [annotation]) and whether None is allowed."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = typing.get_args(annotation)
    return [a for a in args if a is not type(None)], type(None) in args
  return [annotation], False


def _is_parseable(annotation: Any) -> bool:
  """True for the types `_parse` reads from text: the scalars and tuples with element types."""
  return annotation in _SCALARS or (typing.get_origin(annotation) is tuple and bool(typing.get_args(annotation)))


def _is_dataclass_type(annotation: Any) -> bool:
  """True for a dataclass class (a nested config)."""
  return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _is_dict_type(annotation: Any) -> bool:
  """True for `dict` and `dict[K, V]`."""
  return annotation is dict or typing.get_origin(annotation) is dict


def _type_name(annotation: Any) -> str:
  """A readable name of an annotation: "int", "tuple[int, ...]", "str | None"."""
  if isinstance(annotation, type) and not typing.get_args(annotation):
    return annotation.__name__
  return repr(annotation).replace("typing.", "")
