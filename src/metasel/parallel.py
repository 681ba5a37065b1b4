"""Data parallelism with JAX's own sharding: a 1-D data mesh, replicated and row-sharded pytrees, many hosts.

Every program in metasel runs unchanged on several devices: the batch axis (or the M batches of a GSNR
sweep, or the K probes of a DVN meta-update) is sharded over the mesh's one axis, `DATA`, and params and
method state are replicated. Batch-level sums and softmaxes need no hand-written collectives: jit's
partitioner inserts the all-reduces. Inside a traced program the mesh is the ambient one (`jax.set_mesh`),
so `constrain_rows` shards a batch where a mesh is set and does nothing on one device.

Several hosts: call `initialize` first on every host; each loads its own rows (`process_rows`) and
`global_rows` joins them into one global array.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA",
    "data_mesh",
    "resolve_mesh",
    "replicated",
    "row_sharded",
    "replicate",
    "replicated_outputs",
    "use_mesh",
    "shard_rows",
    "global_rows",
    "constrain_rows",
    "check_divides",
    "mesh_size",
    "initialize",
    "is_main_process",
    "process_rows",
]

DATA = "data"  # the data mesh's one axis


def data_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `DATA` over `devices` (default: the first `num_devices` of `jax.devices()`, all when None).

  Its axis is `AxisType.Auto`, so jit partitions gathers such as `pool[indices]` with sharded indices.
  """
  if devices is None:
    available = jax.devices()
    if num_devices is not None and not (isinstance(num_devices, int) and 1 <= num_devices <= len(available)):
      raise ValueError(
          f"num_devices={num_devices!r} but {len(available)} {jax.default_backend()} devices are available;"
          f" expected an integer in [1, {len(available)}] (on a CPU, set JAX_NUM_CPU_DEVICES before JAX starts)"
      )
    devices = available[: num_devices or len(available)]
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=list(devices))


def resolve_mesh(mesh: Mesh | None) -> Mesh | None:
  """`mesh`, else the ambient mesh set with `jax.set_mesh` (when it has a `DATA` axis), else None (one device)."""
  if mesh is not None:
    if DATA not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}; expected a data mesh with axis {DATA!r} (parallel.data_mesh)")
    return mesh
  ambient = jax.sharding.get_mesh()
  if ambient is None or ambient.empty or DATA not in ambient.axis_names:
    return None
  return ambient


def mesh_size(mesh: Mesh | None = None) -> int:
  """Devices along the data axis of `mesh` (default: the ambient mesh, also inside a traced program); 1 without one."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA not in mesh.axis_names:
    return 1
  return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def row_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Axis `axis` split over the data axis, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA))


def check_divides(size: int, devices: int, what: str) -> None:
  """Raise a clear error when `size` rows of `what` cannot be split evenly over `devices` devices."""
  if size % devices:
    raise ValueError(
        f"{what} of {size} does not divide over {devices} devices; expected a multiple of {devices}"
        f" (e.g. {max(devices, size - size % devices)} or {size + devices - size % devices})"
    )


def _put(tree: Any, sharding: NamedSharding) -> Any:
  """`tree`'s leaves placed with `sharding`; with several processes, each gives its addressable shards from its
  own copy of the same values."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """`tree`'s leaves copied whole onto every device of `mesh` (with several processes: from equal copies);
  `tree` as it is without a mesh."""
  return tree if mesh is None else _put(tree, replicated(mesh))


def replicated_outputs(mesh: Mesh | None) -> dict[str, Any]:
  """`jax.jit` options pinning a program's outputs replicated on `mesh` (none without a mesh), the shardings
  `replicate` gives its inputs, so that feeding the outputs back in reuses the compiled program."""
  return {} if mesh is None else {"out_shardings": replicated(mesh)}


def use_mesh(mesh: Mesh | None):
  """`jax.set_mesh(mesh)` as a context, or a context that does nothing without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def shard_rows(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
  """`tree`'s leaves split along `axis` over `mesh`; the axis must divide over the devices."""
  for leaf in jax.tree.leaves(tree):
    check_divides(np.shape(leaf)[axis], mesh.shape[DATA], f"axis {axis} of an array of shape {np.shape(leaf)}")
  return _put(tree, row_sharded(mesh, axis))


def global_rows(local_tree: Any, mesh: Mesh) -> Any:
  """One global array per leaf from each process's own rows (`process_rows`), row-sharded over `mesh`.

  With one process this is `shard_rows`; with several, every process passes its consecutive block and the
  result holds all rows in process order.
  """
  sharding = row_sharded(mesh)
  local_devices = len(mesh.local_devices)
  for leaf in jax.tree.leaves(local_tree):
    check_divides(np.shape(leaf)[0], local_devices, f"this process's rows (an array of shape {np.shape(leaf)})")
  return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), local_tree)


def constrain_rows(tree: Any, what: str = "batch") -> Any:
  """Inside a traced program: shard axis 0 of `tree`'s leaves over the ambient data mesh; unchanged without one.

  The rows must divide over the devices (checked at trace time, with a clear error naming `what`).
  """
  devices = mesh_size()
  if devices == 1:
    return tree
  for leaf in jax.tree.leaves(tree):
    check_divides(leaf.shape[0], devices, what)
  return jax.tree.map(
      lambda leaf: jax.lax.with_sharding_constraint(leaf, PartitionSpec(DATA, *([None] * (leaf.ndim - 1)))), tree
  )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
  """Join a multi-host run (`jax.distributed.initialize`) before any other JAX call; idempotent.

  Without arguments on a cluster JAX detects (SLURM, Cloud TPU, ...) it reads the environment; on one
  machine give `coordinator_address="localhost:PORT"`, `num_processes` and `process_id`.
  """
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
  )


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes logs, results and figures."""
  return jax.process_index() == 0


def process_rows(num_rows: int) -> slice:
  """This process's consecutive block of `num_rows` rows (which must divide over the processes)."""
  count, index = jax.process_count(), jax.process_index()
  check_divides(num_rows, count, "rows")
  share = num_rows // count
  return slice(index * share, (index + 1) * share)
