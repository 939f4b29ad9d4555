"""Two `jax.distributed` processes on localhost (gloo CPU collectives) train the tiny DiT.

Each process owns 2 CPU devices; the plan is fsdp=4, so every parameter is split across both
processes. Each process reads its own half of the shapes data (the real grain pipeline, sharded
by process index) and runs the trainer's loop (sanajax.training.loop: metrics from process 0,
collective Orbax checkpoints with per-process data positions); then both restore the
checkpoint collectively and print a digest of the gathered parameters, which must agree. The
frozen AE is test_parallel's pooling stand-in (what is tested is the multi-host path, not the AE).
"""
import json
import math
import os
import re
import socket
import subprocess
import sys

from xla_env import FAST_COMPILE  # noqa: E402  (tests/xla_env.py; tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_agree(tmp_path):
  port = free_port()
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"localhost:{port}", str(i), str(workdir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=900)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-6000:]
  digests = [re.search(r"DIGEST (.*)", out).group(1) for out in outs]
  print(digests)
  assert digests[0] == digests[1], digests
  for i, out in enumerate(outs):
    assert f"process {i} of 2, 4 global devices" in out
    assert "restored step 3" in out
  # Process 0 alone wrote the metrics, with a finite loss at every step.
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f if '"loss"' in l]
  # Then Ctrl-C to process 1 only: both stop after the same step (past the notice's step 5) with its checkpoint;
  # process 1 names its SIGINT, process 0 the preemption notice it was passed on as.
  stopped = {int(re.search(rf"STOPPED after step (\d+) by {name}", out).group(1))
             for out, name in zip(outs, ("SIGTERM", "SIGINT"))}
  assert len(stopped) == 1 and min(stopped) >= 5, outs
  last = stopped.pop()
  assert [r["step"] for r in rows] == list(range(1, last + 1)) and all(math.isfinite(r["loss"]) for r in rows), rows
  assert os.path.isdir(workdir / "checkpoints" / "3") and os.path.isdir(workdir / "checkpoints" / str(last))


def worker(coordinator: str, process_id: int, workdir: str) -> None:
  from sanajax.parallel import distributed
  distributed.initialize(coordinator, 2, process_id)
  import jax
  import numpy as np
  import test_parallel as tp
  from jax.experimental import multihost_utils

  from sanajax.data.pipeline import make_train_iterator
  from sanajax.data.sources import make_source
  from sanajax.training import loop as loop_lib
  from sanajax.training.metrics import MetricWriter
  from sanajax.workdir.checkpoint import Checkpointer
  print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} global devices", flush=True)
  config, plan, state, step = tp.setup({"fsdp": 4}, batch_size=4, with_grads=False)
  _, _, text, _ = tp.components()
  source = make_source("shapes", config.data.resolution, config.seed)
  data_iter = make_train_iterator(source, batch_size=4 // jax.process_count(), seed=config.seed,
                                  tokenize_fn=text.tokenize, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  writer = MetricWriter(workdir)
  loop = loop_lib.LoopConfig(num_steps=3, batch_size=4, log_every=1, checkpoint_every=3, description="mh")
  loop_lib.run(loop, state, step, data_iter, ckpt, writer)
  ckpt.close()
  writer.close()
  # Restore collectively onto the same plan and compare the full parameters across processes.
  _, _, fresh, _ = tp.setup({"fsdp": 4}, batch_size=4, with_grads=False)
  restored, data_state = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore(fresh)
  print(f"restored step {int(jax.device_get(restored.step))}", flush=True)
  assert data_state["meta"]["process_index"] == process_id, data_state["meta"]
  leaf = restored.params["transformer_blocks_0"]["ff"]["conv_inverted"]["kernel"].value
  assert not leaf.is_fully_addressable and leaf.addressable_shards[0].data.shape == (16, 320)
  params = multihost_utils.process_allgather(restored.params, tiled=True)
  flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
  assert np.all(np.isfinite(flat))
  print(f"DIGEST {flat.size} {flat.sum():.9e} {np.abs(flat).sum():.9e} {flat[::97].sum():.9e}", flush=True)
  stop_on_a_notice_to_one_process(restored, step, data_iter, workdir, process_id)
  # Both reach the end before either starts the runtime's shutdown barrier (which times out
  # when one process is minutes behind, e.g. on a loaded machine).
  multihost_utils.sync_global_devices("sanajax test done")
  jax.distributed.shutdown()


def stop_on_a_notice_to_one_process(state, step, data_iter, workdir: str, process_id: int) -> None:
  """Ctrl-C (SIGINT) to process 1 alone, in step 5 of a longer run: process 1 passes it on as a preemption notice
  (a SIGTERM to itself, which JAX's preemption service catches), and both processes stop at the step the
  service's sync point agrees on, having saved it together (sanajax.training.interrupt). Before, Ctrl-C ended
  the process at once without a checkpoint, and the other one hung in its next collective."""
  import signal

  from sanajax.training import loop as loop_lib
  from sanajax.training.interrupt import TrainingInterrupted
  from sanajax.training.metrics import MetricWriter
  from sanajax.workdir.checkpoint import Checkpointer
  calls = []

  def step_with_notice(s, batch):
    calls.append(None)
    if process_id == 1 and len(calls) == 2:  # step 5 (the run resumes after step 3)
      os.kill(os.getpid(), signal.SIGINT)
    return step(s, batch)

  ckpt, writer = Checkpointer(os.path.join(workdir, "checkpoints")), MetricWriter(workdir)
  loop = loop_lib.LoopConfig(num_steps=40, batch_size=4, log_every=1, checkpoint_every=1000, description="mh")
  try:
    loop_lib.run(loop, state, step_with_notice, data_iter, ckpt, writer)
    raise AssertionError("the run was not stopped")
  except TrainingInterrupted as stopped:
    print(f"STOPPED after step {stopped.step} by {signal.Signals(stopped.signum).name}", flush=True)
  ckpt.close()
  writer.close()


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  os.chdir(REPO)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
