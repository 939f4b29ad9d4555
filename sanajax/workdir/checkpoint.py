"""Orbax checkpointing of a train state together with the data iterator's position.

Layout of WORKDIR/checkpoints/STEP/: `state` (the TrainState pytree, StandardSave) and
`data` (the iterator state as JSON), so a restarted run continues with the same batches.
Saves are asynchronous; `wait()` blocks until the last one is on disk. Sharded states are
written collectively by all hosts and restore onto any mesh: pass `restore` an abstract state
carrying the new shardings (sanajax.parallel.Plan.abstract, or a state built on the new mesh).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def latest_workdir_step(workdir: str) -> int | None:
  """The step of the latest checkpoint under WORKDIR/checkpoints; None when there is none (or no such folder)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  return Checkpointer(ckpt_dir, read_only=True).latest_step()


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
    """Saves asynchronously; with several processes every one must call it (the state's shards are
    written by their owners, and each host's data position is kept under its process index)."""
    data_state = _gather_process_states(data_state or {}) if jax.process_count() > 1 else (data_state or {})
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state))
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
    data = dict(restored.data or {})
    if PROCESS_STATES in data:
      states = data[PROCESS_STATES]
      if len(states) != jax.process_count():
        print(f"Checkpoint data positions are from {len(states)} processes, now {jax.process_count()}: "
              f"the data order restarts.", flush=True)
        data = {}
      else:
        data = states[jax.process_index()]
    return restored.state, data

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


PROCESS_STATES = "process_states"


def _gather_process_states(data_state: dict) -> dict:
  """{"process_states": [state of process 0, 1, ...]}: every host's own data position.

  Orbax writes a JSON item from process 0 only, but each host reads a different shard of the
  data; the positions are gathered (as padded UTF-8 bytes) so each host resumes its own.
  """
  raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return {PROCESS_STATES: [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, lengths)]}


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore args for a pytree of arrays / ShapeDtypeStructs (with shardings where given)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=partial)
