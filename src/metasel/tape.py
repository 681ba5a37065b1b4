"""Ghost taping of standard Flax layers, with no change to the user's model.

While `forward` runs a model, every call of a supported layer is seen from outside: linen layers
through Flax's method interception (`nn.intercept_methods`), NNX layers by giving the merged copy's
layer objects a subclass whose `__call__` reports to the tape (the user's own module is untouched).
Interception was picked over a `jax.custom_vjp` probe because it sees the layer's own attributes
(padding, strides, axes) and parameters, needs no change to the traced program, and costs nothing
after tracing: the recorded values are intermediates the forward pass computes anyway.

For each call the tape keeps the layer's input rows (`metasel.ghost`) and adds a zero perturbation to its
output: the gradient of the summed loss with respect to that perturbation is each sample's
loss-to-output gradient. A layer's parameters are found by identity among the leaves of the params
passed to the model, so a layer whose parameters are not plain leaves, or that is used in a way the
tape cannot see, is reported (`Skipped`) and its parameters take the `vmap` fallback.

Interception alone cannot see a parameter used outside its layer (a tied head through a nested
`.apply`, a kernel rescaled inside the model), so before the taped pass `make_plan` traces the forward
pass once with every layer call under a name scope of its own and keeps on the ghost path only leaves
whose every use is inside a taped call owning them (`metasel.uses`). The same trace gives the shapes of
the perturbations, so the check adds no trace to the two a taped step always took.

Supported: linen `Dense`, `DenseGeneral` (contracting trailing axes, no batch dims), `Conv` (any
strides, kernel dilation and padding; groups, input dilation and masks fall back), `Embed` (its lookups
and `attend`, joined into one "tied" layer), `LayerNorm` and `RMSNorm` (over the last axis), and NNX
`Linear`, `LinearGeneral`, `Conv`, `Embed`, `LayerNorm`, `RMSNorm`. A layer's input must have the batch
on axis 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct
from flax.core.tracers import current_trace

from metasel import adapters, ghost, handlers, uses
from metasel.ghost import ATTEND, EMBED, TIED, LayerInfo, LayerTape
from metasel.adapters import Model, split_outputs

__all__ = [
    "Skipped", "Call", "Forward", "Tape", "Plan", "make_plan", "forward", "zero_perturbations", "joined_calls",
    "layer_rows", "assemble", "hook_nnx",
]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A layer of a supported type that the tape could not take, its parameter leaves and why."""

  name: str
  layer_type: str
  leaves: tuple[int, ...]
  reason: str


@struct.dataclass
class Call:
  """One taped call of a layer: its rows and the shape of its output (where the perturbation goes)."""

  info: LayerInfo = struct.field(pytree_node=False)
  output: jax.ShapeDtypeStruct = struct.field(pytree_node=False)
  rows: jax.Array


@struct.dataclass
class Forward:
  """A taped forward pass: outputs (B, O), embeddings (B, D) or None, the taped calls and skipped layers."""

  outputs: jax.Array
  embeddings: jax.Array | None
  calls: tuple[Call, ...]
  skipped: tuple[Skipped, ...] = struct.field(pytree_node=False)


@struct.dataclass
class Tape:
  """One forward and backward pass: per-sample losses (B,), outputs, embeddings and every taped layer.

  `layers` holds one `ghost.LayerTape` per layer (calls of a layer used several times are joined along
  the position axis); `skipped` names the layers whose parameters need the `vmap` fallback.
  """

  losses: jax.Array
  outputs: jax.Array
  embeddings: jax.Array | None
  layers: tuple[LayerTape, ...]
  skipped: tuple[Skipped, ...] = struct.field(pytree_node=False)

  @property
  def ghost_layers(self) -> tuple[LayerTape, ...]:
    """The layers none of whose parameter leaves a skipped use shares: the ones the ghost algebra may use."""
    shared = {i for s in self.skipped for i in s.leaves}
    return tuple(layer for layer in self.layers if shared.isdisjoint(layer.info.leaves))

  @property
  def taped_leaves(self) -> frozenset[int]:
    """Leaf indices whose per-sample gradients the tape gives exactly: every leaf of the `ghost_layers`."""
    return frozenset(i for layer in self.ghost_layers for i in layer.info.leaves)


# ----------------------------------------------------------------------------------------------------
# The recorder: what one forward pass sees.


class _Recorder:
  """Collects the taped calls of one forward pass, adding perturbations and one sample's step corrections."""

  def __init__(self, params, batch_size: int, perturbations: dict | None, steps: dict | None, scoped: bool = False):
    self.leaf_index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    self.batch_size = batch_size
    self.perturbations = perturbations
    self.steps = steps or {}
    self.scoped = scoped  # mark each layer call's equations with a name scope of its own (`metasel.uses`)
    self.visits = 0
    self.owners: dict[int, frozenset[int]] = {}  # visit number -> the leaves that taped call owns
    self.calls: list[Call] = []
    self.skipped: list[Skipped] = []
    self.last_dense_input: jax.Array | None = None
    self.trace = current_trace()  # a layer run under a JAX transformation inside the model sees another

  def visit(self, handler: handlers.Handler, module, layer_type: str, name: str, params: dict, call: Callable, x, kwargs) -> jax.Array:
    """Run the layer's own `call(x)` and tape it; or note why it cannot be taped and leave the output alone."""
    visit, self.visits = self.visits, self.visits + 1
    with jax.named_scope(uses.scope_name(visit)) if self.scoped else contextlib.nullcontext():
      y = call(x)
    if handler.dense and current_trace() == self.trace:
      self.last_dense_input = x
    roles = tuple((role, self.leaf_index.get(id(params[role]))) for role in handler.roles if params.get(role) is not None)
    rows_fn, reason = handler.prepare(module, x)
    if current_trace() != self.trace:
      reason = "it runs under a JAX transformation inside the model that the tape cannot see through (nn.scan, nn.remat, jax.checkpoint, nn.vmap or their nnx twins, ...)"
    if reason is None and kwargs:
      reason = f"it was called with the options {sorted(kwargs)}"
    if reason is None and any(index is None for _, index in roles):
      reason = (
          "its parameters are computed inside the model (sliced, transposed, scaled or built from other arrays,"
          " e.g. by nn.WeightNorm or from a stacked parameter), not leaves of the params passed to it"
      )
    if reason is None and x.shape[0] != self.batch_size:
      reason = f"its input has leading axis {x.shape[0]}, not the batch of {self.batch_size}"
    if reason is not None:
      self.skip(name, layer_type, tuple(i for _, i in roles if i is not None), reason)
      return y
    info = LayerInfo(name, handler.kind, layer_type, roles)
    self.owners[visit] = frozenset(info.leaves)
    rows = rows_fn(x)
    self.calls.append(Call(info, jax.ShapeDtypeStruct(y.shape, y.dtype), rows))
    if info.leaves in self.steps:
      y = y + ghost.correction(info, rows, self.steps[info.leaves]).reshape(y.shape).astype(y.dtype)
    if self.perturbations is not None:
      y = y + self.perturbations[len(self.calls) - 1]
    return y

  def skip(self, name: str, layer_type: str, leaves: tuple[int, ...], reason: str) -> None:
    self.skipped.append(Skipped(name, layer_type, leaves, reason))

  def leaves_of(self, params: dict) -> tuple[int, ...]:
    return tuple(self.leaf_index[id(v)] for v in params.values() if v is not None and id(v) in self.leaf_index)


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("metasel_tape", default=None)


def _linen_interceptor(next_fun, args, kwargs, context):
  """Tape the `__call__` of supported linen layers and `Embed.attend`; note any other method of theirs."""
  recorder = _ACTIVE.get()
  found = None if recorder is None else handlers.handler_of(type(context.module), handlers.LINEN_HANDLERS)
  if found is None or context.method_name == "setup":
    return next_fun(*args, **kwargs)
  base, handler = found
  module = context.module
  params = dict(module.variables.get("params", {}))
  name = "/".join(str(p) for p in module.path) or type(module).__name__
  method = context.method_name
  if method == "attend" and base is nn.Embed:
    handler, layer_type = handlers.ATTEND_HANDLER, "Embed.attend"
  elif method == "__call__":
    layer_type = base.__name__
  else:
    layer_type = None
  if layer_type is None or len(args) != 1:
    recorder.skip(name, base.__name__, recorder.leaves_of(params), f"it is also used through {method}")
    return next_fun(*args, **kwargs)
  if getattr(type(module), method) is not getattr(base, method):
    reason = f"its class {type(module).__name__} replaces {base.__name__}.{method} (e.g. nn.remat)"
    recorder.skip(name, base.__name__, recorder.leaves_of(params), reason)
    return next_fun(*args, **kwargs)
  return recorder.visit(handler, module, layer_type, name, params, lambda x: next_fun(x, **kwargs), args[0], kwargs)


def _nnx_params(module) -> dict:
  """The arrays behind an NNX layer's parameters (None for an absent bias)."""
  out = {}
  for role in ("kernel", "bias", "embedding", "scale"):
    variable = getattr(module, role, None)
    out[role] = variable.get_value() if isinstance(variable, nnx.Variable) else None
  return out


_TAPED_CLASSES: dict[type, type] = {}


def _nnx_visit(module, handler: handlers.Handler, layer_type: str, method: Callable, x, args, kwargs):
  """Run `method(module, x, *args, **kwargs)` of an NNX layer, reporting it to the active tape if any."""
  recorder = _ACTIVE.get()
  call = lambda v: method(module, v, *args, **kwargs)  # noqa: E731
  if recorder is None:
    return call(x)
  options = dict(kwargs, **{f"arg{i}": a for i, a in enumerate(args)})
  return recorder.visit(handler, module, layer_type, module._metasel_name, _nnx_params(module), call, x, options)


def _taped_class(cls: type, base: type, handler: handlers.Handler) -> type:
  """A subclass of the NNX layer class `cls` whose `__call__` (and `attend`) report to the active tape."""
  if cls not in _TAPED_CLASSES:

    def __call__(self, x, *args, **kwargs):
      return _nnx_visit(self, handler, f"nnx.{base.__name__}", cls.__call__, x, args, kwargs)

    def attend(self, query, *args, **kwargs):
      return _nnx_visit(self, handlers.ATTEND_HANDLER, f"nnx.{base.__name__}.attend", cls.attend, query, args, kwargs)

    members = {"__call__": __call__, **({"attend": attend} if hasattr(cls, "attend") else {})}
    _TAPED_CLASSES[cls] = type(f"Taped{cls.__name__}", (cls,), members)
  return _TAPED_CLASSES[cls]


def hook_nnx(module: nnx.Module) -> None:
  """Let the supported layers of a merged NNX module report to the active tape (nothing when none is active).

  Called by the NNX `Model` on its freshly merged copy while the tape records
  (`adapters.NNX_MERGED`), never on the user's module.
  """
  if _ACTIVE.get() is None:
    return
  for path, node in nnx.iter_graph(module):
    found = handlers.handler_of(type(node), handlers.NNX_HANDLERS) if isinstance(node, nnx.Module) else None
    if found is not None and type(node).__call__ is found[0].__call__:
      node.__class__ = _taped_class(type(node), *found)
      object.__setattr__(node, "_metasel_name", "/".join(str(p) for p in path) or type(module).__name__)


@contextlib.contextmanager
def _recording(recorder: _Recorder, inline_jit: bool):
  """Tape the layers of the model run inside; with `inline_jit`, `jax.jit` inside the model (`nn.jit`, a
  jitted `__call__`) is inlined, so that its layers run in the taped trace, not a cached one the tape never sees."""
  token, hook = _ACTIVE.set(recorder), adapters.NNX_MERGED.set(hook_nnx)
  try:
    with nn.intercept_methods(_linen_interceptor), jax.disable_jit() if inline_jit else contextlib.nullcontext():
      yield recorder
  finally:
    adapters.NNX_MERGED.reset(hook)
    _ACTIVE.reset(token)


# ----------------------------------------------------------------------------------------------------
# Taped passes.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one trace of the forward pass on a batch's shapes finds, for the taped passes that follow.

  Attributes:
    call_outputs: each taped call's output shape, where its perturbation goes (`zero_perturbations`).
    stray: a `Skipped` for each taped leaf that also reaches the outputs outside the calls owning it.
    inline_jit: whether `jax.jit` inside the model is inlined, so that the layers under it are taped.
  """

  call_outputs: tuple[jax.ShapeDtypeStruct, ...]
  stray: tuple[Skipped, ...]
  inline_jit: bool


_JIT = frozenset({"jit", "pjit"})


def _taped_pass(model: Model, params, x: jax.Array, perturbations=None, steps=None, *, inline_jit: bool, scoped: bool = False):
  """The model's raw output on x and the recorder of its supported layer calls."""
  with _recording(_Recorder(params, x.shape[0], perturbations, steps, scoped), inline_jit) as recorder:
    raw = model.apply(params, x)
  return raw, recorder


def _scoped_trace(model: Model, params, x: jax.Array, inline_jit: bool):
  """The forward pass traced to a jaxpr with each layer call under a name scope of its own, and its recorder."""
  seen = {}

  def outputs(p, v):
    raw, seen["recorder"] = _taped_pass(model, p, v, inline_jit=inline_jit, scoped=True)
    return split_outputs(raw, v.shape[0])[0]

  return jax.make_jaxpr(outputs)(params, x), seen["recorder"]


def make_plan(model: Model, params, x: jax.Array) -> Plan:
  """Trace the forward pass once (nothing runs) to find which taped leaves the ghost algebra may claim.

  A leaf is claimed only if every use of it on the way to the outputs is inside a taped call that owns
  it (`metasel.uses`). When some parameter reaches the outputs through `jax.jit` inside the model, the
  pass is traced again with that jit inlined, and the taped passes that follow inline it too.
  """
  num_leaves = len(jax.tree.leaves(params))
  for inline_jit in (False, True):
    closed, recorder = _scoped_trace(model, params, x, inline_jit)
    stray = uses.stray_uses(closed, num_leaves, recorder.owners)
    if inline_jit or not any(use.primitive in _JIT for use in stray.values()):
      break
  owner = {i: call.info for call in recorder.calls for i in call.info.leaves}
  skipped = tuple(Skipped(owner[i].name, owner[i].layer_type, (i,), use.reason) for i, use in stray.items() if i in owner)
  return Plan(tuple(call.output for call in recorder.calls), skipped, inline_jit)


def _shared_skips(calls: list[Call]) -> list[Skipped]:
  """A `Skipped` for each taped layer that shares a leaf with a layer owning other leaves too.

  Calls owning the same leaves are joined into one layer (`joined_calls`); two layers that share only some
  (a kernel tied between two layers with biases of their own) would each miss the other's term.
  """
  layers = {call.info.leaves: call.info for call in calls}
  skipped = []
  for leaves, info in layers.items():
    others = [other for key, other in layers.items() if key != leaves and set(key) & set(leaves)]
    if others:
      names = ", ".join(f"{o.name} ({o.layer_type})" for o in others)
      skipped.append(Skipped(info.name, info.layer_type, leaves, f"it shares parameters with {names}, which own other parameters too"))
  return skipped


def forward(
    model: Model, params, x: jax.Array, *, perturbations: dict | None = None, steps: dict | None = None,
    plan: Plan | None = None,
) -> Forward:
  """Run `model` on x (B, ...) taping every supported layer; returns outputs, embeddings and the calls.

  `perturbations` ({call index: array of the call's output shape}, from `zero_perturbations`) are added
  to the layers' outputs, so that their gradients are the loss-to-output gradients. `steps` ({layer
  leaves: `ghost.step_factors` of one sample}) changes those layers' parameters by that sample's step,
  without forming it. When the model returns logits only, the embedding is the input of its last dense
  layer, flattened to (B, D). `skipped` names every layer the ghost algebra may not use: those the tape
  could not take, and those whose parameters reach the outputs some other way too. `plan`: a `make_plan`
  of this model on x's shapes, to share (made here when None).
  """
  batch = x.shape[0]
  plan = make_plan(model, params, x) if plan is None else plan
  raw, recorder = _taped_pass(model, params, x, perturbations, steps, inline_jit=plan.inline_jit)
  outputs, embeddings = split_outputs(raw, batch)
  if embeddings is None and recorder.last_dense_input is not None and recorder.last_dense_input.shape[0] == batch:
    embeddings = recorder.last_dense_input.reshape(batch, -1)
  skipped = tuple(recorder.skipped) + plan.stray + tuple(_shared_skips(recorder.calls))
  return Forward(outputs, embeddings, tuple(recorder.calls), skipped)


def zero_perturbations(plan: Plan) -> dict[int, jax.Array]:
  """Zeros shaped like every taped call's output in the planned pass ({} when nothing is taped)."""
  return {i: jnp.zeros(output.shape, output.dtype) for i, output in enumerate(plan.call_outputs)}


def joined_calls(calls: tuple[Call, ...]) -> list[list[int]]:
  """The call indices of each layer (calls that own the same parameter leaves), in order of first call."""
  grouped: dict[tuple[int, ...], list[int]] = {}
  for index, call in enumerate(calls):
    grouped.setdefault(call.info.leaves, []).append(index)
  return list(grouped.values())


def _tied_split(fwd: Forward, group: list[int]) -> tuple[list[int], list[int]] | None:
  """(lookup calls, head calls) of a table used through `attend` too; None for any other layer."""
  heads = [i for i in group if fwd.calls[i].info.kind == ATTEND]
  return ([i for i in group if fwd.calls[i].info.kind == EMBED], heads) if heads else None


def _layer_info(fwd: Forward, group: list[int]) -> LayerInfo:
  """The layer of a group of calls: its first call's, made "tied" for a table used through `attend` too."""
  info = fwd.calls[group[0]].info
  if _tied_split(fwd, group) is None:
    return info
  return LayerInfo(info.name, TIED, info.layer_type.removesuffix(".attend"), info.roles)


def _joined(fwd: Forward, group: list[int], value_of: Callable[[int], jax.Array], no_lookup: Callable[[jax.Array], jax.Array]):
  """`value_of(call)` of a layer's calls joined along the positions (axis 1); for a tied table, the pair
  (lookups, heads), the lookups being `no_lookup(heads)` when the table is used through `attend` alone."""
  tied = _tied_split(fwd, group)
  if tied is None:
    return jnp.concatenate([value_of(i) for i in group], axis=1)
  lookups, heads = tied
  head = jnp.concatenate([value_of(i) for i in heads], axis=1)
  return (jnp.concatenate([value_of(i) for i in lookups], axis=1) if lookups else no_lookup(head)), head


def layer_rows(fwd: Forward) -> tuple[tuple[LayerInfo, Any], ...]:
  """Each taped layer's input rows (B, T, in), calls of a layer joined along the positions, as in `assemble`.

  A table used through `attend` too is one "tied" layer whose rows are the pair (ids (B, T), h (B, S, dim)).
  """
  no_ids = lambda h: jnp.zeros((h.shape[0], 0), jnp.int32)  # noqa: E731
  return tuple(
      (_layer_info(fwd, group), _joined(fwd, group, lambda i: fwd.calls[i].rows, no_ids)) for group in joined_calls(fwd.calls)
  )


def assemble(fwd: Forward, output_grads: dict[int, jax.Array], losses: jax.Array) -> Tape:
  """A `Tape` from a taped forward pass and the gradients of its perturbations, calls of a layer joined."""
  batch = losses.shape[0]
  grads_of = lambda i: output_grads[i].reshape(batch, fwd.calls[i].rows.shape[1], -1)  # noqa: E731  (B, T, out)
  layers = []
  for (info, rows), group in zip(layer_rows(fwd), joined_calls(fwd.calls)):
    no_grads = lambda g: jnp.zeros((batch, 0, rows[1].shape[-1]), g.dtype)  # noqa: E731  d (B, 0, dim) of no lookup
    layers.append(LayerTape(info, rows, _joined(fwd, group, grads_of, no_grads)))
  return Tape(losses, fwd.outputs, fwd.embeddings, tuple(layers), fwd.skipped)
