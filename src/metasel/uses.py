"""Which parameter leaves reach a model's outputs only through the taped layer calls that own them.

The ghost algebra gives a leaf's per-sample gradient from the calls of the layer that owns it. That is
the whole gradient only when no other use of the leaf reaches the loss: a tied head that reads the token
embedding through a nested `.apply`, a kernel scaled or normalised inside the model, a parameter passed
into a layer's call. So the tape reads the model's own program: the forward pass is traced once to a
jaxpr with each layer call under a name scope of its own, and every equation that consumes a parameter
leaf and contributes to the outputs must sit inside a taped call that owns that leaf. Any other use puts
the leaf on the `vmap` path, with the use named in the reason.

This is exact (it reads what the computation does, not which layers were intercepted) and costs nothing
in the compiled program; the trace it reads is the one the tape takes anyway to shape its perturbations
(`metasel.tape.make_plan`). It trusts each supported layer's own call to use its parameters as that layer
class does: a subclass that changes the call, or parameters the call receives computed (`nn.WeightNorm`),
are refused by the tape before this check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import NamedTuple

from jax.extend import core as jex

__all__ = ["SCOPE", "Use", "scope_name", "stray_uses"]

SCOPE = "metasel_tape_call_"
_SCOPE_RE = re.compile(re.escape(SCOPE) + r"(\d+)")
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Use(NamedTuple):
  """One use of a parameter leaf outside the taped calls that own it: the primitive and a sentence for users."""

  primitive: str
  reason: str


def scope_name(visit: int) -> str:
  """The name scope that marks the equations of the model's `visit`-th supported layer call."""
  return f"{SCOPE}{visit}"


def _live_eqns(jaxpr: jex.Jaxpr, outputs: int) -> list[jex.JaxprEqn]:
  """The equations (in program order) that contribute to the first `outputs` outputs of `jaxpr`."""
  live = {v for v in jaxpr.outvars[:outputs] if isinstance(v, jex.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jex.Var))
  return kept[::-1]


def _where(eqn: jex.JaxprEqn) -> str:
  """Where an equation comes from: its (Flax) name scope without the tape's, and the user's source line."""
  stack = "/".join(part for part in str(eqn.source_info.name_stack).split("/") if not _SCOPE_RE.fullmatch(part))
  frame = None
  try:
    frames = eqn.source_info.traceback.frames
    frame = next((f for f in frames if not _from_library(f.file_name)), None)
  except AttributeError:  # no traceback recorded
    pass
  line = f"{os.path.basename(frame.file_name)}:{frame.line_num} ({frame.function_name})" if frame else ""
  return " ".join(part for part in (f"in {stack}" if stack else "", f"at {line}" if line else "") if part)


def _from_library(path: str) -> bool:
  """A frame of an installed package (JAX, Flax, ...) or of metasel itself, not of the user's model."""
  return "site-packages" in path.split(os.sep) or path.startswith(_OWN_DIR) or path.startswith("<")


def stray_uses(closed: jex.ClosedJaxpr, num_leaves: int, owners: Mapping[int, frozenset[int]], outputs: int = 1) -> dict[int, Use]:
  """{leaf index: its first such `Use`} for every parameter leaf that reaches the outputs outside a taped call owning it.

  `closed` is the traced forward pass whose first `num_leaves` inputs are the parameter leaves (in
  `jax.tree.leaves` order) and whose first `outputs` outputs are what the loss reads; `owners` maps a
  call's visit number (`scope_name`) to the leaves that taped call owns. Leaves used only by taped
  calls that own them, or not used at all, are absent.
  """
  leaf_of = {v: i for i, v in enumerate(closed.jaxpr.invars[:num_leaves])}
  stray: dict[int, Use] = {}
  for eqn in _live_eqns(closed.jaxpr, outputs):
    inside = {int(n) for n in _SCOPE_RE.findall(str(eqn.source_info.name_stack))}
    for v in eqn.invars:
      index = leaf_of.get(v) if isinstance(v, jex.Var) else None
      if index is None or index in stray or any(index in owners.get(n, ()) for n in inside):
        continue
      where = _where(eqn)
      name = eqn.primitive.name
      stray[index] = Use(name, f"also used outside its layer, by {name}" + (f" {where}" if where else ""))
  for v in closed.jaxpr.outvars[:outputs]:
    if isinstance(v, jex.Var) and v in leaf_of and leaf_of[v] not in stray:
      stray[leaf_of[v]] = Use("output", "also returned by the model as an output")
  return stray
