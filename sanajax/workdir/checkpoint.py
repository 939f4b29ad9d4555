"""Orbax checkpointing of a train state together with the data iterator's position.

Layout of WORKDIR/checkpoints/STEP/: `state` (the TrainState pytree, StandardSave) and
`data` (the iterator state as JSON), so a restarted run continues with the same batches.
Saves are asynchronous; `wait()` blocks until the last one is on disk. Sharded states are
written collectively by all hosts and restore onto any mesh: pass `restore` an abstract state
carrying the new shardings (sanajax.parallel.Plan.abstract, or a state built on the new mesh).

Faults it survives:
- a damaged checkpoint (truncated array files, a deleted state/, garbage JSON): restoring without
  an explicit step falls back to the newest checkpoint that restores, prints one line per damaged
  step, and (writable Checkpointers only, i.e. a training run) renames it to STEP.damaged-TIME so
  Orbax no longer lists it and the next save of that step is possible, while the data stays on
  disk. A read-only opener (sampling, evaluation) falls back the same way but renames nothing: it
  must not change a workdir it only reads (possibly while a run trains in it); the next training
  run sets the damaged step aside. Unfinished saves (`*.orbax-checkpoint-tmp*`, never listed by
  Orbax) are set aside by a training run's restore too.
- a failed asynchronous save (disk full): check_save(), called by the loop every step, raises
  CheckpointSaveError naming the directory as soon as the background write has failed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

DAMAGED = ".damaged-"  # STEP.damaged-TIME: a checkpoint set aside (not a step name for Orbax)
_UNFINISHED = ".orbax-checkpoint-tmp"  # Orbax's name for a save in progress


class _ReadOnlyNotes(logging.Filter):
  """Drops Orbax's warnings that a read-only CheckpointManager is read-only ("W1206 ... read_only=True,
  setting max_to_keep=None", "Given directory is read only=..."): every sampling and evaluation opens
  checkpoints read-only on purpose, and they were 12 of the 13 lines `sample` printed."""

  PREFIXES = ("CheckpointManagerOptions.read_only=True, setting", "Given directory is read only=")

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and str(record.msg).startswith(self.PREFIXES))


# Orbax logs through absl, whose Python logger is "absl"; a filter on it sees every absl.logging call.
if not any(isinstance(f, _ReadOnlyNotes) for f in logging.getLogger("absl").filters):
  logging.getLogger("absl").addFilter(_ReadOnlyNotes())


class CheckpointSaveError(OSError):
  """An asynchronous checkpoint save failed (e.g. the disk is full); names the directory and the cause."""


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

    self.read_only = read_only
    self.restored_step: int | None = None  # the step the last restore() / restore_params() read
    self._saving: int | None = None  # the step of an asynchronous save not yet checked

  def latest_step(self) -> int | None:
    """The newest listed step (not checked for damage: restore falls back past a damaged one)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
    """Saves asynchronously; with several processes every one must call it (the state's shards are
    written by their owners, and each host's data position is kept under its process index)."""
    data_state = _gather_process_states(data_state or {}) if jax.process_count() > 1 else (data_state or {})
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state))
    with self._save_errors(self._saving):  # save() first waits for the previous save, raising its error
      self._manager.save(step, args=args)
    self._saving = step

  def check_save(self) -> None:
    """Raises CheckpointSaveError if the last asynchronous save has failed; returns at once while it is
    still being written (cheap: call it every step)."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_state) at `step` (default: the latest) onto `abstract_state`'s structure.

    `abstract_state` is a pytree of arrays or jax.ShapeDtypeStruct (with shardings, to restore
    onto another mesh).
    """
    args = ocp.args.Composite(state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore())
    restored = self._restore_newest(lambda s: self._manager.restore(s, args=args), step)
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
    key = "ema_params" if ema else "params"
    # Partial restore: only this subtree is read from disk (no optimizer state in memory).
    args = ocp.args.Composite(state=_pytree_restore({key: abstract_params}, partial=True))
    return self._restore_newest(lambda s: self._manager.restore(s, args=args), step).state[key]

  def wait(self) -> None:
    """Blocks until the last save is on disk; CheckpointSaveError if it failed."""
    with self._save_errors(self._saving):
      self._saving = None
      self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def _restore_newest(self, restore_step: Callable[[int], Any], step: int | None) -> Any:
    """restore_step(step) at `step`, or (step None) at the newest step that restores.

    A step that fails while an older one restores is damaged (the same restore arguments work
    on the older one, so the failure is the checkpoint's, not the caller's): one line says so,
    and a writable Checkpointer sets it aside. If none restores, the newest step's error is raised
    and nothing is renamed (e.g. a state of another architecture fails on every step).
    """
    if step is not None:
      result = restore_step(step)
      self.restored_step = step
      return result
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    failures = []
    for candidate in steps:
      try:
        result = restore_step(candidate)
      except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many kinds; judged below)
        failures.append((candidate, e))
        continue
      self.restored_step = candidate
      for damaged, error in failures:
        self._report_damaged(damaged, error, candidate)
      if not self.read_only:
        self._set_aside_unfinished()
      if failures and not self.read_only:
        self._manager.reload()  # the renamed steps are no longer listed
      return result
    newest_error = failures[0][1]
    if len(steps) > 1:
      newest_error.add_note(f"No checkpoint in {self.directory} restores (steps {steps}).")
    raise newest_error

  def _report_damaged(self, step: int, error: Exception, used: int) -> None:
    """One line: which step is damaged and why; a writable Checkpointer renames it aside."""
    # The first line of the error, without TensorStore's spec dump, is enough to tell the kind of damage.
    lines = str(error).strip().split(" See full TensorStore details")[0].splitlines()
    why = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    if self.read_only:
      action = "left in place (read-only here; the next training run sets it aside)"
    else:
      action = f"renamed to {self._set_aside(str(step))}"
    print(f"Checkpoint step {step} in {self.directory} is damaged ({why}); {action}. Using step {used}.", flush=True)

  def _set_aside_unfinished(self) -> None:
    """Sets aside saves a stopped run left unfinished (Orbax ignores them, but they would stay forever)."""
    for name in sorted(os.listdir(self.directory)):
      if _UNFINISHED in name and DAMAGED not in name:
        new = self._set_aside(name)
        print(f"Unfinished checkpoint save {name} in {self.directory} (the run stopped while writing it): "
              f"renamed to {new}.", flush=True)

  def _set_aside(self, name: str) -> str:
    """Renames DIRECTORY/name to STEP.damaged-TIME (process 0 only: the folder is shared); the new name."""
    step = name.split(".", 1)[0]
    new = f"{step}{DAMAGED}{time.strftime('%Y%m%dT%H%M%S')}"
    taken = set(os.listdir(self.directory))
    for i in range(1, len(taken) + 2):  # two set aside in one second keep distinct names
      if new not in taken:
        break
      new = f"{step}{DAMAGED}{time.strftime('%Y%m%dT%H%M%S')}-{i}"
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, name), os.path.join(self.directory, new))
    return new

  def _save_errors(self, step: int | None):
    """A context that turns a failed asynchronous save into CheckpointSaveError naming the directory."""
    return _SaveErrors(self.directory, step)


class _SaveErrors:
  """with-block that re-raises a failed save as CheckpointSaveError ("disk full" when the cause is ENOSPC)."""

  def __init__(self, directory: str, step: int | None):
    self.directory, self.step = directory, step

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb) -> bool:
    if error is None or not isinstance(error, Exception) or isinstance(error, CheckpointSaveError):
      return False
    what = f"the checkpoint of step {self.step}" if self.step is not None else "a checkpoint"
    if _caused_by_enospc(error):
      raise CheckpointSaveError(
          errno.ENOSPC, f"Saving {what} to {self.directory} failed: disk full (No space left on device). "
          f"Training stopped; free space (or set train.keep_checkpoints lower) and rerun to resume from the "
          f"last complete checkpoint.") from error
    raise CheckpointSaveError(f"Saving {what} to {self.directory} failed ({type(error).__name__}: {error}). "
                              f"Training stopped; rerun to resume from the last complete checkpoint.") from error


def _caused_by_enospc(error: BaseException) -> bool:
  """Whether an ENOSPC OSError is anywhere in the exception's cause / context chain (or its message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


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
