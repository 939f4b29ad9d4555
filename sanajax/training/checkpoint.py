"""Orbax checkpointing of a train state together with the data iterator's position.

Layout of WORKDIR/checkpoints/STEP/: `state` (the TrainState pytree, StandardSave) and
`data` (the iterator state as JSON), so a restarted run continues with the same batches.
Saves are asynchronous; `wait()` blocks until the last one is on disk.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for (state, data-iterator state) pairs."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state or {}))
    self._manager.save(step, args=args)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_state) at `step` (default: the latest) onto `abstract_state`'s structure.

    `abstract_state` is a pytree of arrays or jax.ShapeDtypeStruct (with shardings, to restore
    onto another mesh).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data or {})

  def restore_params(self, abstract_params: Any, *, ema: bool = True, step: int | None = None) -> Any:
    """Restores only the (EMA) parameters of a saved TrainState, for sampling and evaluation."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    key = "ema_params" if ema else "params"
    # Partial restore: only this subtree is read from disk (no optimizer state in memory).
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=_pytree_restore({key: abstract_params}, partial=True)))
    return restored.state[key]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore args for a pytree of arrays / ShapeDtypeStructs (with shardings where given)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=partial)
