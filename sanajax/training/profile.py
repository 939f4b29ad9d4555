"""A jax.profiler trace of chosen training steps (`config.train.profile_steps`, e.g. (11, 13)).

    profiler = StepProfiler((11, 13), "WORKDIR/tensorboard")
    for step in ...:
      profiler.before(step)          # starts the trace before step 11's batch is read
      state = ...one step...
      profiler.after(step, state)    # after step 13: waits for its result, stops, says where the trace is
    profiler.close()                 # stops a trace an exception left running

The trace (XLA's device and host activity: the step's kernels, the input pipeline, the host-to-device
copies) goes to DIRECTORY/plugins/profile/<time>/, where TensorBoard's Profile tab finds it (the
tensorboard-plugin-profile package) and Perfetto (ui.perfetto.dev) opens its perfetto_trace.json.gz.
Step 1 includes compiling the step: profile later steps to see the steady state. Every process of a
multi-process run writes its own host's trace there.
"""
from __future__ import annotations

from typing import Any

import jax


class StepProfiler:
  """Traces steps first..last (inclusive) of a run; `steps` () or None traces nothing."""

  def __init__(self, steps: tuple[int, int] | None, directory: str):
    self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
    self.directory = directory
    self.active = False
    self.started = 0  # the step the running trace started at

  def skipped_by(self, start: int) -> str | None:
    """What to tell a run resumed at step `start` whose profile steps were all before it (nothing is traced)."""
    if 0 < self.first and self.last <= start:
      return (f"train.profile_steps=({self.first}, {self.last}): this run resumes after step {start}, so nothing "
              f"is traced; choose later steps.")
    return None

  def before(self, step: int) -> None:
    if not self.active and self.first <= step <= self.last:  # a resumed run starts past `first`
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True
      self.started = step

  def after(self, step: int, state: Any) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)  # the step's device work belongs to the trace
      self.close()
      print(f"Profile of steps {self.started}-{step} (jax.profiler) in {self.directory}/plugins/profile: "
            f"TensorBoard's Profile tab, or perfetto_trace.json.gz in ui.perfetto.dev.", flush=True)

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
