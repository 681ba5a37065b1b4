"""Orbax checkpoints of the training loop's state (any NamedTuple with a PRNG `key` field) and history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpoints"]


class Checkpoints:
  """Orbax checkpoints of a loop state and its history after each epoch, for resuming a run.

  `settings` (JSON-ready) are saved with each checkpoint and must match for it to be restored. Every
  process of a multi-host run saves and restores together; a state restores onto the shardings of the
  target it is given, so onto another device count.
  """

  def __init__(self, directory: str | os.PathLike, settings: dict[str, Any]):
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
    self.settings = settings

  @staticmethod
  def _saveable(state):
    """The state with its PRNG key as raw key data, which orbax stores as a plain array."""
    return state._replace(key=jax.random.key_data(state.key))

  def restore(self, state) -> tuple[Any, list[dict[str, Any]]] | None:
    """The latest saved (state, history), or None when there is none yet."""
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._saveable(state))
    restored = self.manager.restore(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    if restored.meta["settings"] != self.settings:
      raise ValueError(
          f"checkpoint in {self.manager.directory} was made with settings {restored.meta['settings']},"
          f" not {self.settings}; expected the same settings (only epochs may change) or a new folder"
      )
    state = restored.state._replace(key=jax.random.wrap_key_data(restored.state.key))
    return state, restored.meta["history"]

  def save(self, epoch: int, state, history: list[dict[str, Any]]) -> None:
    """Save the state after `epoch` epochs with the history so far, and wait for the write to finish."""
    meta = {"settings": self.settings, "history": history}
    self.manager.save(
        epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(self._saveable(state)), meta=ocp.args.JsonSave(meta))
    )
    self.manager.wait_until_finished()  # the next epoch donates these buffers
