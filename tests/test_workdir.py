"""A workdir survives misuse: one writer at a time, a damaged latest checkpoint, a full disk, a resume's
metrics, and the progress bar's clock (sanajax/workdir/lock.py, workdir/checkpoint.py, training/loop.py)."""
import errno
import glob
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import test_training  # tests/ is on sys.path: its tiny DiT config
from absl import logging as absl_logging

from sanajax import config_utils
from sanajax.generation import Generator
from sanajax.training import autoencoder as ae_lib
from sanajax.training import dit as train_lib
from sanajax.training import loop as loop_lib
from sanajax.training import sprint as sprint_lib
from sanajax.training.metrics import MetricWriter, read_metrics
from sanajax.training.state import create_train_state
from sanajax.workdir import lock as lock_lib
from sanajax.workdir.checkpoint import DAMAGED, Checkpointer, CheckpointSaveError
from sanajax.workdir.lock import WorkdirLockedError, hold_workdir

small_config = test_training.small_config
REPO = test_training.REPO


# --- one writer per workdir ---------------------------------------------------------------------------------------

def start_holder(workdir):
  """Another process holding workdir's lock, as a running trainer does; returns once it holds it."""
  code = ("import sys, time\nfrom sanajax.workdir.lock import hold_workdir\n"
          f"hold_workdir({str(workdir)!r})\nprint('held', flush=True)\ntime.sleep(120)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_trainer_refuses_at_once_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  holder = start_holder(workdir)
  try:
    # Each trainer refuses before any work: the AE stage / teacher load would fail the test if reached.
    def no_work(*args, **kwargs):
      raise AssertionError("the trainer started working on a locked workdir")

    monkeypatch.setattr(train_lib, "ensure_ae", no_work)
    monkeypatch.setattr(ae_lib, "prepare_workdir", no_work)
    monkeypatch.setattr(sprint_lib, "setup", no_work)
    trainers = [lambda: train_lib.train(small_config(tmp_path / "ae"), str(workdir)),
                lambda: ae_lib.train_ae(config_utils.load_config("configs/dcae_tiny.py"), str(workdir)),
                # A valid config (the whole config is checked before the lock): any existing folder as teacher.
                lambda: sprint_lib.distill(config_utils.load_config("configs/sprint_tiny.py", overrides={
                    "teacher_workdir": str(tmp_path)}), str(workdir))]
    for trainer in trainers:
      start = time.perf_counter()
      with pytest.raises(WorkdirLockedError) as refused:
        trainer()
      assert time.perf_counter() - start < 5
      message = str(refused.value)
      assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message, message
      assert "started 20" in message and str(workdir) in message and "\n" not in message, message
  finally:
    holder.send_signal(signal.SIGKILL)  # killed: no atexit, the lock file stays behind
    holder.wait()
  assert os.path.exists(workdir / ".lock")

  with pytest.warns(UserWarning, match=rf"stale lock .*pid {holder.pid} on .* is not running"):
    lock = hold_workdir(str(workdir))
  with lock:
    assert lock_lib._read(str(workdir / ".lock"))["pid"] == os.getpid()
    with hold_workdir(str(workdir)):  # reentrant in one process (the trainer, then run_from_config)
      pass
    assert os.path.exists(workdir / ".lock")
  assert not os.path.exists(workdir / ".lock")  # released with the last hold


def test_the_lock_is_released_on_an_exception_and_another_hosts_lock_is_not_taken(tmp_path):
  with pytest.raises(ZeroDivisionError), hold_workdir(str(tmp_path)):
    1 / 0  # noqa: B018
  assert not os.path.exists(tmp_path / ".lock")
  (tmp_path / ".lock").write_text('{"host": "other-host", "pid": 1, "started": "2026-01-02T03:04:05"}')
  with pytest.raises(WorkdirLockedError, match=r"host other-host, pid 1, started 2026-01-02T03:04:05.*delete"):
    hold_workdir(str(tmp_path))
  (tmp_path / ".lock").write_text("{not json")  # a damaged lock file is stale (once it is not being written)
  os.utime(tmp_path / ".lock", (time.time() - 60, time.time() - 60))
  with pytest.warns(UserWarning, match="unreadable lock file"):
    hold_workdir(str(tmp_path)).release()
  assert not os.path.exists(tmp_path / ".lock")


# --- damaged checkpoints ------------------------------------------------------------------------------------------

def small_state(scale):
  return create_train_state({"w": jnp.arange(300.0) * scale}, optax.sgd(0.1), jax.random.PRNGKey(0))


def truncate_arrays(step_dir):
  """Truncates every array data file of a checkpoint to half (a copy cut short, a full disk)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


DAMAGE = {
    "truncated arrays": truncate_arrays,
    "deleted state/": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbage data JSON": lambda d: pathlib.Path(d, "data", "metadata").write_text("{garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_falls_back_past_a_damaged_latest_checkpoint(tmp_path, damage, capsys):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=2)
  ckpt.save(1, small_state(1.0), {"position": 1})
  ckpt.save(2, small_state(2.0), {"position": 2})
  ckpt.close()
  DAMAGE[damage](os.path.join(directory, "2"))
  abstract = small_state(0.0)

  # A reader (sampling) falls back and renames nothing.
  reader = Checkpointer(directory, read_only=True)
  state, data = reader.restore(abstract)
  assert reader.restored_step == 1 and data == {"position": 1}
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(300.0))
  assert sorted(os.listdir(directory)) == ["1", "2"]
  out = capsys.readouterr().out
  assert f"Checkpoint step 2 in {directory} is damaged (" in out and "Using step 1." in out

  # A training run falls back too, sets the damaged step aside (kept on disk) and can save that step again.
  writer = Checkpointer(directory, keep=2)
  state, data = writer.restore(abstract)
  assert writer.restored_step == 1 and data == {"position": 1} and writer.all_steps() == [1]
  aside = [n for n in os.listdir(directory) if n.startswith("2" + DAMAGED)]
  assert len(aside) == 1 and f"renamed to {aside[0]}" in capsys.readouterr().out
  writer.save(2, small_state(3.0), {"position": 2})
  writer.close()
  state, _ = Checkpointer(directory, read_only=True).restore(abstract)
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(300.0) * 3)


def test_unreadable_metadata_and_an_unfinished_save_do_not_block_a_restore(tmp_path, capsys):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=2)
  ckpt.save(1, small_state(1.0))
  ckpt.save(2, small_state(2.0))
  ckpt.close()
  pathlib.Path(directory, "2", "_CHECKPOINT_METADATA").write_text("{garbage")  # Orbax restores without it
  shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp-1234"))
  writer = Checkpointer(directory)
  state, _ = writer.restore(small_state(0.0))
  assert writer.restored_step == 2
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(300.0) * 2)
  assert "3.orbax-checkpoint-tmp-1234" not in os.listdir(directory)
  assert [n for n in os.listdir(directory) if n.startswith("3" + DAMAGED)]
  assert "Unfinished checkpoint save 3.orbax-checkpoint-tmp-1234" in capsys.readouterr().out
  writer.save(3, small_state(3.0))
  writer.close()
  assert Checkpointer(directory, read_only=True).all_steps() == [2, 3]


def test_a_state_that_fits_no_checkpoint_raises_and_renames_nothing(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, keep=2)
  ckpt.save(1, small_state(1.0))
  ckpt.save(2, small_state(2.0))
  ckpt.close()
  other = create_train_state({"w": jnp.zeros(7)}, optax.sgd(0.1), jax.random.PRNGKey(0))  # another architecture
  with pytest.raises(ValueError, match="shape") as error:
    Checkpointer(directory).restore(other)
  assert "No checkpoint" in "".join(getattr(error.value, "__notes__", []))
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_a_truncated_latest_checkpoint_resumes_and_samples_from_the_older_one(tmp_path, tiny_ae, capsys):
  """Train to 6 (checkpoints 3 and 6), truncate 6, run again: it continues from 3 (exactly: the losses of
  4-6 repeat), metrics.jsonl holds each step once, and sampling falls back past a damaged latest step."""
  workdir = tmp_path / "run"
  config = small_config(tiny_ae)
  train_lib.train(config, str(workdir))
  first = {r["step"]: r["loss"] for r in read_metrics(str(workdir))}
  assert sorted(first) == [1, 2, 3, 4, 5, 6]
  truncate_arrays(str(workdir / "checkpoints" / "6"))
  capsys.readouterr()

  train_lib.train(config, str(workdir))
  out = capsys.readouterr().out
  assert "Checkpoint step 6 in" in out and "is damaged" in out and "Using step 3." in out
  assert "Resumed from checkpoint at step 3" in out
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once: the first run's 4-6 were dropped
  assert {r["step"]: r["loss"] for r in rows} == first
  names = os.listdir(workdir / "checkpoints")
  assert {"3", "6"} <= set(names) and any(n.startswith("6" + DAMAGED) for n in names)

  truncate_arrays(str(workdir / "checkpoints" / "6"))
  generator = Generator.from_workdir(str(workdir))
  assert "Checkpoint step 6" in capsys.readouterr().out
  abstract = jax.eval_shape(lambda: train_lib.init_dit_params(config, jax.random.PRNGKey(0)))
  step3 = Checkpointer(str(workdir / "checkpoints"), read_only=True).restore_params(abstract, step=3)
  for a, b in zip(jax.tree.leaves(generator.dit_params), jax.tree.leaves(step3)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images = generator.generate(["a red circle"], steps=2, cfg=1.0)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
  assert os.path.isdir(workdir / "checkpoints" / "6")  # a reader renames nothing


# --- a failed asynchronous save ------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(monkeypatch):
  """Orbax's JSON writer (the `data` item, written in the save's background thread) fails with ENOSPC."""

  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)


class FakeIterator:
  def __next__(self):
    return {}


def test_a_failed_asynchronous_save_stops_the_run_at_the_next_step(tmp_path, full_disk):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  steps_run = []

  def step_fn(state, batch):
    steps_run.append(int(state.step) + 1)
    if int(state.step) == 2:  # the save of step 2 is under way: let its background write fail first
      while ckpt._manager.is_saving_in_progress():
        time.sleep(0.01)
    return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0)}

  loop = loop_lib.LoopConfig(num_steps=10, batch_size=1, log_every=1, checkpoint_every=2)
  with pytest.raises(CheckpointSaveError) as stopped:
    loop_lib.run(loop, small_state(1.0), step_fn, FakeIterator(), ckpt, writer)
  assert steps_run == [1, 2, 3]  # stopped after the step that followed the failed save
  message = str(stopped.value)
  assert str(tmp_path / "checkpoints") in message and "step 2" in message, message
  assert "disk full (No space left on device)" in message, message
  assert stopped.value.errno == errno.ENOSPC


# --- metrics.jsonl after a resume ----------------------------------------------------------------------------------

def test_resuming_drops_the_metric_rows_after_the_restored_step(tmp_path):
  """A run killed at step 5 after its checkpoint at 3 logged 4 and 5; the resumed run logs them again."""
  workdir = str(tmp_path)
  config = config_utils.load_config("configs/tiny.py", overrides={
      "train.num_steps": 6, "train.log_every": 1, "train.checkpoint_every": 3, "train.batch_size": 1})

  def step_fn(state, batch):
    return state.replace(step=state.step + 1), {"loss": jnp.float32(state.step)}

  loop_lib.run_from_config(config.train, workdir, small_state(1.0), step_fn, FakeIterator(), description="t")
  # The kill: step 6's checkpoint never happened, and a partial line was being written.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "lo')
  loop_lib.run_from_config(config.train, workdir, small_state(1.0), step_fn, FakeIterator(), description="t")
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in rows] == [0, 1, 2, 3, 4, 5]


# --- the progress bar's clock --------------------------------------------------------------------------------------

def test_the_progress_bar_rate_excludes_the_first_steps_compile(tmp_path, monkeypatch):
  seen = {}

  class Recording(loop_lib.tqdm):
    def close(self):
      seen.update(self.format_dict)
      super().close()

  monkeypatch.setattr(loop_lib, "tqdm", Recording)

  def step_fn(state, batch):
    time.sleep(4.0 if int(state.step) == 0 else 0.01)  # the first call compiles
    return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0)}

  loop = loop_lib.LoopConfig(num_steps=20, batch_size=1, log_every=100, checkpoint_every=100)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  loop_lib.run(loop, small_state(1.0), step_fn, FakeIterator(), ckpt, MetricWriter(str(tmp_path), tensorboard=False))
  # The rate the bar shows (and its ETA divides by): its running average, else steps since `initial` / elapsed.
  rate = seen["rate"] or (seen["n"] - seen["initial"]) / seen["elapsed"]
  # Counted, the 4 s compile would make elapsed >= 4 s and the rate <= 5 steps/s; not counted, 19 steps may
  # take up to ~0.18 s each (a loaded 2-core machine) and pass.
  assert seen["n"] == 20 and seen["elapsed"] < 3.5, seen
  assert rate > 6, seen


# --- what a user sees ----------------------------------------------------------------------------------------------

def test_opening_checkpoints_read_only_logs_no_orbax_warnings(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, small_state(1.0))
  ckpt.close()
  with caplog.at_level(logging.WARNING):
    Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore_params(small_state(0.0).ema_params)
    absl_logging.warning("Given directory is a test=%s", 1)  # other absl warnings still pass
  messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert messages == ["Given directory is a test=1"], messages


# --- data that stops coming ----------------------------------------------------------------------------------------

class FailingData:
  """Batches {"i": position} with grain's get_state / set_state; the read of position `fail_at` raises (once)."""

  def __init__(self, fail_at):
    self.position, self.fail_at = 0, fail_at

  def __next__(self):
    if self.position == self.fail_at:
      self.fail_at = None
      raise RuntimeError("Worker process was terminated unexpectedly with exit code -9. Search the logs above.")
    self.position += 1
    return {"i": self.position - 1}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def test_data_that_stops_coming_saves_the_last_step_and_the_rerun_reads_on_from_it(tmp_path):
  """The read of batch 5 fails (a grain worker killed by the OOM killer) in a run that checkpoints every 4 steps,
  with two batches prefetched (the failure comes while step 4's batch is handed out): steps 1-5 run on batches
  0-4, step 5 is saved with the data position after batch 4, and DataLoaderFailed names the cause and the step to
  resume from. Before, the error's traceback ended the run in step 4 (the batch handed out with the failed
  prefetch was lost) and steps 4 and 5 were not saved."""
  workdir = str(tmp_path)
  config = config_utils.load_config("configs/tiny.py", overrides={
      "train.num_steps": 8, "train.log_every": 1, "train.checkpoint_every": 4, "train.batch_size": 1})
  seen = []

  def step_fn(state, batch):
    seen.append(int(batch["i"]))
    return state.replace(step=state.step + 1), {"loss": jnp.float32(batch["i"])}

  data = FailingData(fail_at=5)
  with pytest.raises(loop_lib.DataLoaderFailed) as failed:
    loop_lib.run_from_config(config.train, workdir, small_state(1.0), step_fn, data, description="t",
                             shard_fn=lambda b: b)
  assert str(failed.value) == (
      "the data loader failed before step 6 (RuntimeError: Worker process was terminated unexpectedly with exit "
      f"code -9. Search the logs above.); the same command resumes from step 5 (its checkpoint is in "
      f"{tmp_path / 'checkpoints'}).")
  assert seen == [0, 1, 2, 3, 4]
  assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == [4, 5]
  loop_lib.run_from_config(config.train, workdir, small_state(1.0), step_fn, FailingData(fail_at=None),
                           description="t", shard_fn=lambda b: b)
  assert seen == [0, 1, 2, 3, 4, 5, 6, 7]  # the rerun reads on from batch 5
  assert [r["loss"] for r in read_metrics(workdir)] == list(range(8))

  class Unreadable(FailingData):
    def __next__(self):
      raise OSError()  # no message

  with pytest.raises(loop_lib.DataLoaderFailed) as failed:
    loop_lib.run_from_config(config.train, str(tmp_path / "first"), small_state(1.0), step_fn, Unreadable(None),
                             description="t", shard_fn=lambda b: b)
  assert str(failed.value) == ("the data loader failed before step 1 (OSError); no checkpoint yet: the same command "
                               "starts again.")
