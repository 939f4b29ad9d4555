"""The trainer's promises: exact resume after a kill, the NaN guard, metrics, clear CLI errors."""
import contextlib
import gzip
import io
import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from processes import children_of, wait_until_gone  # tests/processes.py (tests/ is on sys.path)
from tiny_base import AE_OVERRIDES  # tests/tiny_base.py (tests/ is on sys.path)

from sanajax import config_utils
from sanajax.parallel import Plan
from sanajax.training import dit as train_lib
from sanajax.training import loop as loop_lib
from sanajax.training.interrupt import TrainingInterrupted
from sanajax.training.metrics import MetricWriter, read_metrics
from sanajax.workdir.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(ae_dir, **overrides):
  """The tiny config shrunk to seconds: 32 px, the smallest model (tests/small_configs.py), batch 4."""
  base = {
      **AE_OVERRIDES, "ae.workdir": str(ae_dir), "train.batch_size": 4,
      "train.num_steps": 6, "train.log_every": 1, "train.checkpoint_every": 3, "train.warmup_steps": 2,
      "eval.num_prompts": 12,
  }
  base.update(overrides)
  return config_utils.load_config("configs/tiny.py", overrides=base)


def final_params(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  return ckpt.latest_step(), ckpt


class Killed(Exception):
  pass


@contextlib.contextmanager
def killed_after_checkpoint(workdir, step: int):
  """The training run inside raises Killed right after it saves checkpoint `step` in `workdir` (the save
  completes: the loop's `finally` waits for it), and the `with` block expects that. A kill between two steps
  that does not depend on how many batches the loop's device prefetch reads ahead (loop.DevicePrefetch)."""
  real = Checkpointer.save
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))

  def save(self, s, *args, **kwargs):
    real(self, s, *args, **kwargs)
    if s == step and self.directory == directory:
      raise Killed()

  with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
    patch.setattr(Checkpointer, "save", save)
    yield


def wrapped_iterator(make_iterator, on_batch):
  """make_train_iterator whose batches pass through on_batch(count, batch) (1-based count)."""

  def make(*args, **kwargs):
    it = make_iterator(*args, **kwargs)

    class Wrapped:
      count = 0

      def __next__(self):
        Wrapped.count += 1
        return on_batch(Wrapped.count, next(it))

      def get_state(self):
        return it.get_state()

      def set_state(self, s):
        it.set_state(s)

    return Wrapped()

  return make


@pytest.mark.parametrize("latent_cache", [0, 16])
def test_killed_run_resumes_exactly(tmp_path, tiny_ae, latent_cache):
  # latent_cache 16: the DiT reads AE latents encoded once at start-up (rebuilt on resume).
  config = small_config(tiny_ae, **{"data.latent_cache": latent_cache})
  train_lib.train(config, str(tmp_path / "straight"))

  with killed_after_checkpoint(tmp_path / "killed", 3):
    train_lib.train(config, str(tmp_path / "killed"))
  assert Checkpointer(str(tmp_path / "killed" / "checkpoints"), read_only=True).latest_step() == 3
  train_lib.train(config, str(tmp_path / "killed"))

  assert_same_run(config, tmp_path / "straight", tmp_path / "killed")


def assert_same_run(config, straight, resumed):
  """The two workdirs of `config` hold the same final weights (EMA too) and logged the same loss at every step."""
  abstract = jax.eval_shape(lambda: train_lib.init_dit_params(config, jax.random.PRNGKey(0)))
  for ema in (False, True):
    a = Checkpointer(str(straight / "checkpoints"), read_only=True).restore_params(abstract, ema=ema)
    b = Checkpointer(str(resumed / "checkpoints"), read_only=True).restore_params(abstract, ema=ema)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  losses = [{r["step"]: r["loss"] for r in read_metrics(str(run))} for run in (straight, resumed)]
  assert set(losses[0]) == set(range(1, config.train.num_steps + 1)) and losses[0] == losses[1], losses


def tensorboard_values(directory, tag):
  """[(step, summary value)] of `tag` in the TensorBoard event files of `directory`, in file order (TFRecords of
  tensorboardX's Event protos: length u64, its crc u32, the bytes, their crc u32)."""
  from tensorboardX.proto import event_pb2
  values = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      values += [(event.step, v) for v in event.summary.value if v.tag == tag]
      i += 12 + n + 4
  return values


def tensorboard_steps(directory, tag):
  return [step for step, _ in tensorboard_values(directory, tag)]


def test_a_stop_signal_saves_the_step_it_arrives_in_and_the_rerun_resumes_exactly(tmp_path, tiny_ae, monkeypatch):
  """SIGTERM (a preemption notice) in step 4, between the checkpoints of steps 3 and 6: the run finishes step 4,
  saves it, and raises TrainingInterrupted; from then on the signals' handlers are the previous ones (a second
  Ctrl-C stops at once), and after the run the lock is gone and TensorBoard's events are on disk. The rerun
  resumes at step 4 and ends where an uninterrupted run ends. (A kill with no checkpoint since step 3 would redo
  step 4.)"""
  assert threading.current_thread() is threading.main_thread()  # Python delivers signals to the main thread only
  config = small_config(tiny_ae, **{"data.latent_cache": 16})  # test_killed_run_resumes_exactly's programs
  train_lib.train(config, str(tmp_path / "straight"))
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  real_scalars, seen = MetricWriter.scalars, {}

  def scalars(self, step, row):
    real_scalars(self, step, row)
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread
      seen.update({s: signal.getsignal(s) for s in previous})

  monkeypatch.setattr(MetricWriter, "scalars", scalars)
  with pytest.raises(TrainingInterrupted) as stopped:
    train_lib.train(config, str(tmp_path / "stopped"))
  monkeypatch.undo()
  assert seen == previous and {s: signal.getsignal(s) for s in previous} == previous
  assert (stopped.value.step, stopped.value.exit_code) == (4, 143)
  assert str(stopped.value) == (f"stopped by SIGTERM after step 4; its checkpoint is in "
                                f"{tmp_path / 'stopped' / 'checkpoints'}. Run the same command again to resume from it.")
  assert Checkpointer(str(tmp_path / "stopped" / "checkpoints"), read_only=True).all_steps() == [3, 4]
  assert not (tmp_path / "stopped" / ".lock").exists()
  assert tensorboard_steps(tmp_path / "stopped" / "tensorboard" / "train", "loss") == [1, 2, 3, 4]  # flushed
  train_lib.train(config, str(tmp_path / "stopped"))
  assert_same_run(config, tmp_path / "straight", tmp_path / "stopped")


def test_profile_steps_trace_those_steps_into_tensorboard(tmp_path, tiny_ae, capsys):
  """train.profile_steps=(2, 3) of a 6-step run: one jax.profiler session in WORKDIR/tensorboard/plugins/profile
  (TensorBoard's Profile tab) whose Perfetto trace holds the train step's call twice (steps 2 and 3)."""
  workdir = tmp_path / "p"
  train_lib.train(small_config(tiny_ae, **{"train.profile_steps": (2, 3), "eval.num_prompts": 0}), str(workdir))
  sessions = list((workdir / "tensorboard" / "plugins" / "profile").iterdir())
  assert len(sessions) == 1 and any(p.name.endswith(".xplane.pb") for p in sessions[0].iterdir()), sessions
  with gzip.open(sessions[0] / "perfetto_trace.json.gz") as f:
    trace = json.load(f)
  calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("name") == "PjitFunction(step)")
  outermost = [c for i, c in enumerate(calls) if not any(o[0] <= c[0] and c[1] <= o[1] for o in calls[:i])]
  assert len(outermost) == 2, calls  # a call appears as an outer and an inner event
  assert f"Profile of steps 2-3 (jax.profiler) in {workdir / 'tensorboard'}/plugins/profile" in capsys.readouterr().out
  # A run resumed past them traces nothing, and says why (the loop prints this before its bar).
  from sanajax.training.profile import StepProfiler
  assert StepProfiler((2, 3), str(workdir)).skipped_by(3) == (
      "train.profile_steps=(2, 3): this run resumes after step 3, so nothing is traced; choose later steps.")
  assert StepProfiler((2, 3), str(workdir)).skipped_by(2) is None and StepProfiler(None, "").skipped_by(9) is None


def test_sample_grids_show_the_configured_prompts_every_sample_every_steps(tmp_path, tiny_ae):
  """train.sample_every=3 with train.sample_prompts (SANA's validation_prompts): TensorBoard's grids at steps 3 and
  6 are those prompts' samples of the EMA weights, as sampling the run's checkpoint gives them (before, the grid
  always showed 16 shapes prompts: a SANA run on photos drew circles)."""
  from PIL import Image

  from sanajax.eval import after_training
  from sanajax.generation import Generator, make_grid
  prompts = ("a red circle", "two blue squares")
  config = small_config(tiny_ae, **{"train.sample_every": 3, "train.sample_prompts": prompts, "sample.steps": 2,
                                    "eval.num_prompts": 0})
  workdir = tmp_path / "grids"
  train_lib.train(config, str(workdir), make_sample_fn=after_training.make_grid_fn)
  grids = {step: np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)).convert("RGB"))
           for step, v in tensorboard_values(workdir / "tensorboard" / "train", "samples")}
  assert sorted(grids) == [3, 6]
  want = make_grid(Generator.from_workdir(str(workdir)).generate(list(prompts), sampler=config.sample.sampler, steps=2,
                                                                 cfg=config.sample.cfg, seed=config.seed))
  assert grids[6].shape == want.shape == (32, 64, 3)
  assert np.abs(grids[6].astype(int) - want).max() <= 2, np.abs(grids[6].astype(int) - want).max()
  assert np.abs(grids[3].astype(int) - want).max() > 2  # step 3's EMA weights are another model


def test_nan_guard_names_step_and_quantity(tmp_path, tiny_ae, monkeypatch):
  config = small_config(tiny_ae, **{"train.num_steps": 5, "train.checkpoint_every": 100})

  def poison_3(count, batch):
    if count == 3:
      batch = {k: np.full_like(v, np.nan) if k in ("image", "latent") else v for k, v in batch.items()}
    return batch

  monkeypatch.setattr(train_lib, "make_train_iterator", wrapped_iterator(train_lib.make_train_iterator, poison_3))
  with pytest.raises(loop_lib.NonFiniteError, match=r"Non-finite loss at step 3"):
    train_lib.train(config, str(tmp_path / "nan"))


def test_metrics_jsonl_has_step_and_loss(tmp_path, tiny_ae):
  config = small_config(tiny_ae, **{"train.num_steps": 2})
  train_lib.train(config, str(tmp_path / "m"))
  rows = read_metrics(str(tmp_path / "m"))
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 and r["images_per_s"] > 0
  assert os.listdir(tmp_path / "m" / "tensorboard" / "train")


def run_cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def start_train_ae_with_workers(workdir):
  """`sanajax.train_ae` in its own process group, with 2 grain worker processes, long and with no checkpoint due."""
  return subprocess.Popen([sys.executable, "-m", "sanajax.train_ae", "--config=configs/dcae_tiny.py",
                           f"--workdir={workdir}", "--config.data.resolution=32", "--config.train.batch_size=4",
                           "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
                           "--config.train.num_steps=100000", "--config.data.num_workers=2"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def wait_for_step(proc, workdir, step):
  deadline = time.time() + 240
  while max([r["step"] for r in read_metrics(str(workdir))] if (workdir / "metrics.jsonl").exists() else [0]) < step:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)


def stop_group(proc, sig):
  """Sends sig to proc's whole process group (as a terminal's Ctrl-C or a scheduler's notice reaches every process
  of the job); (stdout, stderr) once it exits."""
  try:
    os.killpg(proc.pid, sig)
    return proc.communicate(timeout=120)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)


def check_one_stop_line(proc, out, err, workdir, sig):
  """Exit 128 + signal, as a shell reports a command the signal stopped, with one line naming the step saved and how
  to resume; no traceback (the workers leave the signal to the trainer), nothing leaked. The step saved."""
  step = Checkpointer(str(workdir / "checkpoints"), read_only=True).latest_step()
  assert proc.returncode == 128 + sig and step >= 2, (proc.returncode, step, err[-3000:])
  assert "Traceback" not in err and "leaked" not in err and "Done." not in out, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      f"sanajax.train_ae: stopped by {sig.name} after step {step}; its checkpoint is in {workdir / 'checkpoints'}. "
      f"Run the same command again to resume from it."), err[-3000:]
  return step


def test_ctrl_c_stops_the_cli_with_a_checkpoint_and_one_line(tmp_path):
  """Ctrl-C in a terminal (SIGINT to the whole process group: the trainer and its 2 grain worker processes) in
  `sanajax.train_ae`, a long run with no checkpoint due: it exits 130 with one line."""
  workdir = tmp_path / "ae"
  proc = start_train_ae_with_workers(workdir)
  wait_for_step(proc, workdir, 2)
  out, err = stop_group(proc, signal.SIGINT)
  check_one_stop_line(proc, out, err, workdir, signal.SIGINT)
  assert "SIGINT received: stopping after this step with a checkpoint (Ctrl-C again stops at once" in err
  # Resuming from it is the restore after any checkpoint (test_a_stop_signal_saves_..., above, resumes in-process).


def test_a_preemption_notice_to_every_process_saves_the_step_and_a_killed_trainer_leaves_no_workers(tmp_path):
  """SIGTERM to every process of the job (SLURM's --signal, a TPU VM's shutdown): exit 143 with one line, as Ctrl-C.
  Before, the grain workers died of it, leaving their shared memory behind ("leaked shared_memory objects"; and a
  trainer waiting for their batch failed without saving). Then the resumed run's trainer alone is SIGKILLed (the
  OOM killer): its workers exit within seconds; before, they spun forever on a queue nobody read."""
  workdir = tmp_path / "ae"
  proc = start_train_ae_with_workers(workdir)
  wait_for_step(proc, workdir, 2)
  out, err = stop_group(proc, signal.SIGTERM)
  saved = check_one_stop_line(proc, out, err, workdir, signal.SIGTERM)

  proc = start_train_ae_with_workers(workdir)
  try:
    wait_for_step(proc, workdir, saved + 2)
    children = children_of(proc.pid)
    assert len(children) >= 2, children  # the two workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.communicate()
    wait_until_gone(children, 30, "workers left without their trainer")
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)


def test_a_data_worker_killed_by_the_oom_killer_ends_the_cli_in_one_line_with_its_steps_saved(tmp_path):
  """One of train_ae's 2 grain workers SIGKILLed (as the out-of-memory killer does): the trainer saves the last step
  it completed and exits 1 with one line naming the cause and the step the same command resumes from. Before, a
  traceback, and every step since the last checkpoint lost (here: all of them)."""
  workdir = tmp_path / "ae"
  proc = start_train_ae_with_workers(workdir)
  try:
    wait_for_step(proc, workdir, 2)
    workers = [p for p in children_of(proc.pid)
               if b"resource_tracker" not in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
  saved = Checkpointer(str(workdir / "checkpoints"), read_only=True).latest_step()
  assert proc.returncode == 1 and saved >= 2 and "Traceback" not in err, (proc.returncode, saved, err[-3000:])
  # (multiprocessing's resource tracker then says it cleans up the killed worker's shared memory.)
  line = (rf"sanajax\.train_ae: the data loader failed before step {saved + 1} \(RuntimeError: Worker process was "
          rf"terminated unexpectedly with exit code -9\.[^\n]*\); the same command resumes from step {saved} \(its "
          rf"checkpoint is in {re.escape(str(workdir / 'checkpoints'))}\)\.")
  assert any(re.fullmatch(line, l) for l in err.splitlines()), err[-3000:]


def test_sample_cli_errors_on_missing_workdir(tmp_path):
  r = run_cli("sanajax.sample", f"--workdir={tmp_path / 'nope'}", "--prompt=a red circle", f"--out={tmp_path / 'o'}")
  assert r.returncode != 0
  assert "does not exist" in r.stderr + r.stdout


def test_sample_cli_errors_on_missing_checkpoint(tmp_path):
  (tmp_path / "w").mkdir()
  config = small_config(tmp_path / "ae")
  from sanajax.workdir.files import prepare_workdir
  prepare_workdir(str(tmp_path / "w"), config)
  r = run_cli("sanajax.sample", f"--workdir={tmp_path / 'w'}", "--prompt=a red circle", f"--out={tmp_path / 'o'}")
  assert r.returncode != 0
  assert "No checkpoint" in r.stderr + r.stdout


def test_sample_prompts_file_drops_geneval_categories(tmp_path):
  from absl import app

  from sanajax.sample import read_prompts
  f = tmp_path / "p.txt"
  f.write_text("a red circle\tsingle\n\nthree blue squares\tcounting\n")
  assert read_prompts(str(f), None) == ["a red circle", "three blue squares"]
  f.write_text("a red circle\nthree blue squares\n")
  assert read_prompts(str(f), None) == ["a red circle", "three blue squares"]
  f.write_text("a red circle\tsingle\nthree blue squares\n")  # mixed: ambiguous, refused
  with pytest.raises(app.UsageError, match="TAB"):
    read_prompts(str(f), None)


def test_sample_cfg_interval_flag_parses():
  from absl import app

  from sanajax.sample import parse_cfg_interval
  assert parse_cfg_interval("0.5,1") == (0.5, 1.0)
  assert parse_cfg_interval("None") is None
  for bad in ("0.5", "a,b", "0.7,0.2", "0,1.5"):
    with pytest.raises(app.UsageError, match="cfg_interval"):
      parse_cfg_interval(bad)


def test_train_cli_rejects_unknown_config_field(tmp_path):
  r = run_cli("sanajax.train", "--config=configs/tiny.py", "--config.train.no_such_field=3",
              f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "no_such_field" in r.stderr + r.stdout


def test_changed_architecture_in_existing_workdir_is_refused(tmp_path):
  from sanajax.workdir.files import WorkdirConfigError, load_workdir_config, prepare_workdir
  prepare_workdir(str(tmp_path), small_config(tmp_path / "ae"))
  # No checkpoint yet, so nothing to resume: a corrected command (another AE, another depth) takes the workdir.
  prepare_workdir(str(tmp_path), small_config(tmp_path / "ae2", **{"model.depth": 3}))
  assert load_workdir_config(str(tmp_path)).model.depth == 3
  ckpt = Checkpointer(os.path.join(tmp_path, "checkpoints"))
  ckpt.save(1, {"w": np.zeros(3, np.float32)})
  ckpt.wait()
  with pytest.raises(WorkdirConfigError, match=r"different config.model \(fields \['depth'\]\)"):
    prepare_workdir(str(tmp_path), small_config(tmp_path / "ae2", **{"model.depth": 2}))
  with pytest.raises(WorkdirConfigError, match=r"different config.ae \(fields \['workdir'\]\)"):
    prepare_workdir(str(tmp_path), small_config(tmp_path / "ae", **{"model.depth": 3}))
  prepare_workdir(str(tmp_path), small_config(tmp_path / "ae2", **{"model.depth": 3}))  # the same config resumes


def test_train_without_an_ae_or_ae_train_writes_nothing(tmp_path):
  """A config that cannot train its AE (the SANA configs) and no AE: one line naming the field, before the
  workdir is written, so the corrected command is not refused as a different run."""
  config = small_config(tmp_path / "no_ae")
  del config["ae_train"]
  with pytest.raises(FileNotFoundError, match="No AE checkpoint in .*no_ae. Set --config.ae.workdir"):
    train_lib.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_a_models_workdir_given_as_the_ae_workdir_is_refused_naming_its_ae(tmp_path):
  """--config.ae.workdir=A_DIT_RUN: one line naming that run's AE, before the new workdir is written (an AE would
  otherwise be trained into the DiT's folder, to be refused there as a different run)."""
  from sanajax.workdir.files import prepare_workdir
  run = tmp_path / "run"
  prepare_workdir(str(run), small_config(run / "ae"))
  ckpt = Checkpointer(os.path.join(run, "checkpoints"))
  ckpt.save(1, {"w": np.zeros(3, np.float32)})
  ckpt.wait()
  message = f"ae.workdir='{run}' is a text-to-image model's workdir, not an autoencoder's; its AE is {run / 'ae'}."
  with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
    train_lib.train(small_config(run), str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new" / "config.json")


def test_a_model_run_and_its_autoencoder_do_not_take_each_others_workdir(tmp_path):
  """train --workdir=RUN/ae and train_ae --workdir=RUN (the two folders swapped): one line each naming what the
  folder holds, before any work, and neither config.json is overwritten (train_ae replaced the DiT's, then failed
  on its checkpoint with orbax's tree mismatch)."""
  from sanajax.training import autoencoder as ae_lib
  from sanajax.workdir.files import WorkdirConfigError, prepare_workdir
  run = tmp_path / "run"
  config = small_config(run / "ae")
  for folder, its_config in ((run, config), (run / "ae", train_lib.ae_train_config(config))):
    prepare_workdir(str(folder), its_config)
    ckpt = Checkpointer(os.path.join(folder, "checkpoints"))
    ckpt.save(1, {"w": np.zeros(3, np.float32)})
    ckpt.wait()
  saved = {folder: (folder / "config.json").read_text() for folder in (run, run / "ae")}
  with pytest.raises(WorkdirConfigError, match=f"^{re.escape(str(run / 'ae'))} holds checkpoints of an autoencoder's "
                                               f"run, not of a text-to-image model's: give the model its own --workdir "
                                               f"\\(the model run this AE belongs to is {re.escape(str(run))}\\)\\.$"):
    train_lib.train(small_config(tmp_path / "another_ae"), str(run / "ae"))
  with pytest.raises(WorkdirConfigError, match=f"^{re.escape(str(run))} holds checkpoints of a text-to-image model's "
                                               f"run, not of an autoencoder's: give the autoencoder its own --workdir"):
    ae_lib.train_ae(train_lib.ae_train_config(config), str(run))
  assert {folder: (folder / "config.json").read_text() for folder in saved} == saved
  assert not (tmp_path / "another_ae").exists()


def test_a_converted_text_encoders_workdir_is_no_other_runs_workdir(tmp_path):
  """The third kind of workdir, a converted text encoder (config.json with only `text`, as `convert
  --from=transformers` writes it): an AE run there passed the model-or-not check and replaced its config.json."""
  from sanajax.workdir.files import WorkdirConfigError, prepare_workdir
  text, ae = tmp_path / "text_encoder", tmp_path / "ae"
  config = small_config(ae)
  for folder, its_config in ((text, ml_collections.ConfigDict({"text": config.text.to_dict()})),
                             (ae, train_lib.ae_train_config(config))):
    prepare_workdir(str(folder), its_config)
    ckpt = Checkpointer(os.path.join(folder, "checkpoints"))
    ckpt.save(0, {"w": np.zeros(3, np.float32)})
    ckpt.wait()
  saved = (text / "config.json").read_text()
  cases = ((text, train_lib.ae_train_config(config), "a text encoder's", "an autoencoder's"),
           (text, config, "a text encoder's", "a text-to-image model's"),
           (ae, ml_collections.ConfigDict({"text": config.text.to_dict()}), "an autoencoder's", "a text encoder's"))
  for folder, its_config, held, new in cases:
    with pytest.raises(WorkdirConfigError, match=f"^{re.escape(str(folder))} holds checkpoints of {held} run, not of "
                                                 rf"{new}: give this run its own --workdir\.$"):
      prepare_workdir(str(folder), its_config)
  assert (text / "config.json").read_text() == saved


def test_cached_latents_give_the_loss_of_encoding_in_the_step(tiny_ae):
  """The step's loss on a batch of cached latents equals its loss on the images they came from."""
  import jax.numpy as jnp

  from sanajax.data.pipeline import make_train_iterator
  from sanajax.data.sources import make_source
  from sanajax.models.sana_dit import build_dit
  from sanajax.workdir.loaders import build_text_encoder, load_ae
  config = small_config(tiny_ae)
  ae_model, ae_params, scaling, _ = load_ae(tiny_ae)
  text = build_text_encoder(config)
  batch = next(make_train_iterator(make_source("shapes", 32, 0), batch_size=4, seed=0, tokenize_fn=text.tokenize))
  cached = dict(batch, latent=np.asarray(train_lib.make_encode_fn(ae_model, ae_params)(batch["image"])))
  del cached["image"]
  loss_fn = jax.jit(train_lib.make_loss_fn(config, build_dit(config.model), ae_model, text, scaling,
                                              Plan.single_device()))
  params = train_lib.init_dit_params(config, jax.random.PRNGKey(0))
  frozen = {"ae": ae_params, "text": text.params}
  key = jax.random.PRNGKey(5)
  from_images = float(loss_fn(params, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, key))
  from_cache = float(loss_fn(params, frozen, {k: jnp.asarray(v) for k, v in cached.items()}, key))
  assert from_images > 0.1
  np.testing.assert_allclose(from_cache, from_images, rtol=1e-5)


def test_training_on_a_folder_skips_corrupt_images(tmp_path, tiny_ae):
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / f"img{i}.txt").write_text("a red circle\n")
  (folder / "broken.png").write_bytes(b"not a png at all")
  (folder / "broken.txt").write_text("a blue square\n")
  config = small_config(tiny_ae, **{"data.source": f"folder:{folder}", "train.num_steps": 3})
  train_lib.train(config, str(tmp_path / "run"))
  rows = read_metrics(str(tmp_path / "run"))
  assert rows[-1]["step"] == 3
  # 3 batches of 4 from 6 good images: the broken one comes up at least once per epoch.
  assert rows[-1]["skipped_images"] >= 1
  # With a latent cache the broken image is met (and counted) once, while the cache is built.
  config = small_config(tiny_ae, **{"data.source": f"folder:{folder}", "train.num_steps": 3, "data.latent_cache": 100})
  train_lib.train(config, str(tmp_path / "cached"))
  rows = read_metrics(str(tmp_path / "cached"))
  assert rows[-1]["step"] == 3 and rows[-1]["skipped_images"] == 1
