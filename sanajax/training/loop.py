"""The generic training loop shared by the DiT, the AE and Sprint distillation.

It owns what every run needs and nothing model-specific: resume from the latest checkpoint,
a progress bar with ETA, metrics.jsonl + TensorBoard, throughput (images/s, TFLOP/s), the
NaN guard, periodic asynchronous checkpoints, and optional sample grids.

What it survives: a second run on the workdir (the lock, sanajax.workdir.lock, refuses it); a
damaged latest checkpoint (the resume falls back to the newest that restores); a failed
asynchronous save (checked every step: the run stops at the step after it, naming the folder);
the rows a killed run logged after its last checkpoint (dropped on resume, logged again); SIGTERM
or Ctrl-C (the step in progress is finished and saved, then sanajax.training.interrupt's
TrainingInterrupted ends the run); data that stops coming (a data worker killed, a read error: the
last step done is saved, then DataLoaderFailed names the cause). The bar's clock starts after the
first step, whose call includes compiling it.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from sanajax.models.sana_dit import STACKED_BLOCKS, stack_layers, to_layout, unstack_layers
from sanajax.training.interrupt import DataLoaderFailed, StopRequests
from sanajax.training.loss_plot import LOSS_PLOT_FILE, write_loss_plot
from sanajax.training.metrics import MetricWriter, read_metrics
from sanajax.training.profile import StepProfiler
from sanajax.training.state import NAN_QUANTITIES
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.lock import hold_workdir


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a NaN/Inf: names the step and the quantity."""


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  batch_size: int
  log_every: int = 50
  checkpoint_every: int = 1000
  sample_every: int = 0
  flops_per_step: float | None = None  # model FLOPs of one training step (forward + backward).
  description: str = "train"
  profile_steps: tuple[int, int] | None = None  # (first, last): a jax.profiler trace of these steps
  profile_dir: str = ""  # where it goes (run_from_config: WORKDIR/tensorboard)


def check_finite(state: Any) -> None:
  """Stops the run if the state recorded a non-finite update (see state.apply_gradients)."""
  nan_step = int(jax.device_get(state.nan_step))
  if nan_step >= 0:
    quantity = NAN_QUANTITIES[int(jax.device_get(state.nan_code))]
    raise NonFiniteError(
        f"Non-finite {quantity} at step {nan_step}: the update was not applied and training stopped. "
        f"The last checkpoint holds finite parameters; lower the learning rate or check the data.")


class DevicePrefetch:
  """An iterator of batches already on the devices: `size` batches are sharded (shard_fn, e.g.
  Plan.shard_batch: host numpy -> global arrays split by the plan) ahead of the one the step uses,
  so their host-to-device copies overlap the running step instead of preceding the next.

  get_state() / set_state() keep the data position exact: the state saved with a checkpoint is the
  source's state right after the batch last handed out (not after the ones in flight), and
  set_state drops the batches in flight. A source's error is raised once the batches read before it
  are handed out, so get_state() then is still the position after the last good batch. Other
  attributes (e.g. `skipped`) are the source's.
  """

  def __init__(self, source: Iterator, shard_fn: Callable[[Any], Any], size: int = 2):
    self.source, self.shard_fn, self.size = source, shard_fn, size
    self._queue: collections.deque = collections.deque()  # (device batch, source state after it)
    self._state = source.get_state() if hasattr(source, "get_state") else None
    self._error: Exception | None = None  # the source's, once it failed

  def _fill(self) -> None:
    while len(self._queue) < self.size and self._error is None:
      try:
        batch = next(self.source)
      except StopIteration:
        return
      except Exception as e:  # raised once the batches read before it are used (__next__)
        self._error = e
        return
      state = self.source.get_state() if hasattr(self.source, "get_state") else None
      self._queue.append((self.shard_fn(batch), state))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      if self._error is not None:
        raise self._error
      raise StopIteration
    batch, self._state = self._queue.popleft()
    self._fill()  # the next batches' copies start now, while the caller's step runs
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state) -> None:
    self._queue.clear()
    self._error = None
    self.source.set_state(state)
    self._state = state

  def __getattr__(self, name):
    return getattr(self.source, name)


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def _restore_any_layout(ckpt: Checkpointer, init_state: Any) -> tuple[Any, dict]:
  """ckpt.restore(init_state), or, when the checkpoint holds the DiT blocks in the other layout
  (model.scan_layers changed between runs), a restore in that layout converted back to init_state's
  (sana_dit.stack_layers / unstack_layers, optimizer moments included) and placed as init_state is."""
  try:
    return ckpt.restore(init_state)
  except Exception as error:  # pylint: disable=broad-except  # re-raised below unless the other layout restores
    abstract = _abstract(init_state)
    stacked = any(any(isinstance(k, jax.tree_util.DictKey) and k.key == STACKED_BLOCKS for k in path)
                  for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0])
    other = unstack_layers(abstract) if stacked else stack_layers(abstract)
    if jax.tree.structure(other) == jax.tree.structure(abstract):
      raise  # no SANA blocks in this state: the error is not about their layout
    try:
      state, data_state = ckpt.restore(other)
    except Exception:  # pylint: disable=broad-except
      raise error from None
    print(f"Checkpoint in the {'unrolled' if stacked else 'stacked'} block layout: converted to this run's "
          f"model.scan_layers={stacked}.", flush=True)
    state = to_layout(state, stacked)
    return jax.device_put(state, jax.tree.map(lambda x: x.sharding, abstract)), data_state


def restore_or_init(ckpt: Checkpointer, init_state: Any, data_iter: Any) -> Any:
  """Returns the newest checkpointed state that restores (and positions data_iter) or init_state.

  A damaged latest checkpoint is reported and set aside by Checkpointer.restore, which falls back
  to the newest intact one. A checkpoint saved with the other model.scan_layers restores converted.
  """
  if ckpt.latest_step() is None:
    return init_state
  state, data_state = _restore_any_layout(ckpt, init_state)
  step = ckpt.restored_step
  if data_state and hasattr(data_iter, "set_state"):
    data_iter.set_state(data_state)
  logging.info("Resumed from %s at step %d.", ckpt.directory, step)
  print(f"Resumed from checkpoint at step {step} ({ckpt.directory}).", flush=True)
  return state


def restart_clock(bar: tqdm) -> None:
  """Starts the bar's clock now: called when the first step's call returns, before its update.

  That call includes XLA compiling the step (minutes for a large model); counted, it made the first
  ETA "3:34:16". unpause() moves the start (and the last print) to now, so the elapsed time and the
  rate (the average of per-update rates, or steps / elapsed) count only the steps that follow.
  """
  bar.set_postfix_str("", refresh=False)  # drops "compiling the step"
  bar.unpause()


def run(loop: LoopConfig, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]], data_iter: Iterator,
        ckpt: Checkpointer, writer: MetricWriter, *, sample_fn: Callable[[Any], np.ndarray] | None = None,
        extra_metrics: Callable[[], dict] | None = None) -> Any:
  """Runs step_fn from state.step to loop.num_steps and returns the final state.

  step_fn(state, batch) -> (state, metrics) must be jitted; metrics are only fetched at logging
  steps so the device is never waited on in between.
  """
  start = int(jax.device_get(state.step))
  if start >= loop.num_steps:
    print(f"{loop.description}: already at step {start} >= num_steps {loop.num_steps}; nothing to do.", flush=True)
    return state
  profiler = StepProfiler(loop.profile_steps, loop.profile_dir)
  if (note := profiler.skipped_by(start)) and jax.process_index() == 0:
    print(note, flush=True)
  bar = tqdm(total=loop.num_steps, initial=start, desc=loop.description, unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0, mininterval=2.0)
  bar.set_postfix_str("compiling the step", refresh=True)
  last_time, last_step = time.perf_counter(), start
  step = start
  metrics = {}
  try:
    with StopRequests(loop.description) as stop:  # SIGTERM / Ctrl-C: this step is saved, then TrainingInterrupted
      for step in range(start + 1, loop.num_steps + 1):
        profiler.before(step)
        try:
          batch = next(data_iter)
        except StopIteration:
          raise
        except Exception as e:  # a data worker killed (the OOM killer), a read error: keep the steps done
          raise data_loader_failed(e, step, start, loop, state, data_iter, ckpt) from e
        state, metrics = step_fn(state, batch)
        profiler.after(step, state)
        if step == start + 1:
          restart_clock(bar)
        bar.update(1)
        ckpt.check_save()  # a failed asynchronous save stops the run at the next step, not the next save
        if step % loop.log_every == 0 or step == loop.num_steps:
          metrics = jax.device_get(metrics)
          check_finite(state)
          now = time.perf_counter()
          steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          row = {k: float(np.asarray(v)) for k, v in metrics.items()}
          row["steps_per_s"] = steps_per_s
          row["images_per_s"] = steps_per_s * loop.batch_size
          if loop.flops_per_step:
            row["tflops_per_s"] = steps_per_s * loop.flops_per_step / 1e12
          if extra_metrics is not None:
            row.update(extra_metrics())
          writer.scalars(step, row)
          bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", refresh=False)
        if loop.sample_every and step % loop.sample_every == 0 and sample_fn is not None:
          writer.image(step, "samples", sample_fn(state))
        stopping = stop.requested(step)  # asked every step, on every process (multi-process: a sync point)
        if stopping or step % loop.checkpoint_every == 0 or step == loop.num_steps:
          check_finite(state)
          ckpt.save(step, state, data_iter.get_state() if hasattr(data_iter, "get_state") else None)
        if stopping:
          ckpt.wait()
          raise stop.interrupted(step, ckpt.directory)
  finally:
    profiler.close()
    bar.close()
    ckpt.wait()
  return state


def data_loader_failed(cause: Exception, step: int, start: int, loop: LoopConfig, state: Any, data_iter: Iterator,
                       ckpt: Checkpointer) -> DataLoaderFailed:
  """The error to raise when the batch of `step` cannot be read, after saving step - 1 where it is not saved yet
  (one process only: a collective save would wait for processes whose data still flows). The data position
  saved is the one after step - 1's batch (DevicePrefetch raises a source's error only when no batch read before
  it is left), so the resumed run reads what this one would have."""
  done = step - 1
  if jax.process_count() == 1 and done > start and done % loop.checkpoint_every != 0:
    check_finite(state)
    ckpt.save(done, state, data_iter.get_state() if hasattr(data_iter, "get_state") else None)
    ckpt.wait()
  return DataLoaderFailed(step, ckpt.latest_step(), ckpt.directory, cause)


def run_from_config(train_config: Any, workdir: str, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]],
                    data_iter: Iterator, *, description: str, flops_per_step: float | None = None,
                    sample_fn: Callable[[Any], np.ndarray] | None = None,
                    on_done: Callable[[Any, MetricWriter], None] | None = None,
                    shard_fn: Callable[[Any], Any] | None = None) -> Any:
  """The run every trainer (DiT, AE, Sprint) makes of a config's `train` section; returns the final state.

  Checkpoints go to WORKDIR/checkpoints (keeping train_config.keep_checkpoints) and a run resumes
  from the latest one (restore_or_init, which also positions data_iter); metrics go to WORKDIR
  (MetricWriter), with the data's `skipped_images` count beside the step's; the loop runs to
  train_config.num_steps, logging every log_every and checkpointing every checkpoint_every
  steps, and traces train_config.profile_steps (if any) into WORKDIR/tensorboard. step_fn: `run`'s
  (may be built from the fresh state: restoring keeps its layout).
  on_done(state, writer): called after the last step, before the writer is closed (e.g. to log
  an evaluation at the final step). shard_fn (e.g. Plan.shard_batch, which passes such batches
  through when step_fn applies it again): batches go to the devices two ahead (DevicePrefetch).

  The workdir's lock (sanajax.workdir.lock) is held throughout: the trainers take it first thing,
  and this takes it again (reentrant) for callers that do not. metrics.jsonl keeps only rows up to
  the restored step (a killed run's later steps are logged again by this one). At the end the
  loss curve is drawn to WORKDIR/loss.png (sanajax.training.loss_plot).
  """
  with hold_workdir(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=train_config.keep_checkpoints)
    if shard_fn is not None:
      data_iter = DevicePrefetch(data_iter, shard_fn, size=2)
    state = restore_or_init(ckpt, state, data_iter)
    writer = MetricWriter(workdir)
    writer.drop_after(int(jax.device_get(state.step)))
    loop = LoopConfig(num_steps=train_config.num_steps, batch_size=train_config.batch_size,
                      log_every=train_config.log_every, checkpoint_every=train_config.checkpoint_every,
                      sample_every=int(train_config.get("sample_every", 0) or 0), flops_per_step=flops_per_step,
                      description=description, profile_steps=tuple(train_config.get("profile_steps") or ()) or None,
                      profile_dir=os.path.join(workdir, "tensorboard"))
    try:
      try:
        state = run(loop, state, step_fn, data_iter, ckpt, writer, sample_fn=sample_fn,
                    extra_metrics=lambda: {"skipped_images": getattr(data_iter, "skipped", 0)})
      finally:  # grain's worker processes (data.num_workers) stop here, however the run ends
        if callable(getattr(data_iter, "close", None)):
          data_iter.close()
      if on_done is not None:
        on_done(state, writer)
    finally:  # however the run ends (a stop signal, the NaN guard, a failed evaluation): TensorBoard's buffered
      writer.close()  # events reach the disk
    ckpt.close()
    if jax.process_index() == 0 and os.path.exists(writer.path):
      write_loss_plot(read_metrics(workdir), os.path.join(workdir, LOSS_PLOT_FILE), title=f"{description} loss")
  return state
