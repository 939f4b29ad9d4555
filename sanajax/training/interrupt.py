"""Stopping a run without losing steps: SIGTERM (a scheduler's preemption notice, `kill`) or Ctrl-C.

On the first signal the training loop finishes the step it is in, saves a checkpoint of that step (unless it
has just saved it), waits for the save, and raises TrainingInterrupted; the CLIs turn that into one line and
exit code 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a killed command.
Restarting the same command resumes at that step exactly. The handlers are the previous ones again from the
first signal on, so a second Ctrl-C stops at once (KeyboardInterrupt), giving up the checkpoint being made.

    with StopRequests() as stop:
      for step in ...:
        ...one step...
        if stop.requested(step):
          ...save step...; raise stop.interrupted(step, checkpoint_directory)

A multi-process run must stop every process at the same step, so there the step comes from JAX's
preemption sync point (multihost_utils.reached_preemption_sync_point: the coordination service catches
SIGTERM on any host and agrees on the next step all hosts reach), and SIGTERM gets no Python handler. Ctrl-C
there (SIGINT, to one process or to each, e.g. launch/local_multiprocess.sh in a terminal) is passed on to that
service as a SIGTERM of the process's own, so it too stops every process at one step with its checkpoint.
Outside the main thread (Python delivers signals there only) nothing is installed and nothing stops a run.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Self

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
  """A run that ended early having kept its work: the CLIs print the message as one line and exit with exit_code."""
  exit_code = 1


class TrainingInterrupted(RunStopped):
  """A stop signal ended the run after saving the checkpoint of `step` in `directory`."""

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum, self.directory = step, signum, directory
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is in {directory}. "
                     f"Run the same command again to resume from it.")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class DataLoaderFailed(RunStopped):
  """The batch for `step` never came (a data worker process killed, e.g. by the out-of-memory killer; a read
  error of a shard); `saved_step`: the checkpoint in `directory` the same command resumes from (the step before,
  saved by the loop unless several processes run), None when there is none."""

  def __init__(self, step: int, saved_step: int | None, directory: str, cause: BaseException):
    self.step, self.saved_step, self.directory = step, saved_step, directory
    why = ": ".join([type(cause).__name__] + str(cause).strip().splitlines()[:1])  # its first line, if any
    resume = (f"the same command resumes from step {saved_step} (its checkpoint is in {directory})"
              if saved_step is not None else "no checkpoint yet: the same command starts again")
    super().__init__(f"the data loader failed before step {step} ({why}); {resume}.")


class StopRequests:
  """Context manager: while it is entered, SIGTERM and SIGINT ask the loop to stop (requested(step))."""

  def __init__(self, description: str = "train"):
    self.description = description
    self.signum: int | None = None
    self._previous: dict[int, object] = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> Self:
    if threading.current_thread() is not threading.main_thread():
      return self
    if not self._multiprocess:
      self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    elif jax.config.jax_enable_preemption_service:  # SIGTERM is the service's own (its handler is not Python's)
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._handle)}
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    self.signum = signum
    self._restore()  # a second signal does what it did before: Ctrl-C raises KeyboardInterrupt, SIGTERM ends it
    print(f"\n{self.description}: {signal.Signals(signum).name} received: stopping after this step with a "
          f"checkpoint" + (" (Ctrl-C again stops at once, without it)." if signum == signal.SIGINT else "."),
          file=sys.stderr, flush=True)
    if self._multiprocess:  # the preemption service's SIGTERM handler tells every process (see the module doc)
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether the run should save `step` and stop (call it once per step, on every process)."""
    if not self._multiprocess:
      return self.signum is not None
    try:
      agreed = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False
    if agreed and self.signum is None:  # the notice came to another process, or as a SIGTERM
      self.signum = signal.SIGTERM
    return agreed

  def interrupted(self, step: int, directory: str) -> TrainingInterrupted:
    return TrainingInterrupted(step, self.signum, directory)
