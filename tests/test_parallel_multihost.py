"""Two `jax.distributed` processes on localhost (gloo CPU collectives) train the tiny config.

Each process owns 2 CPU devices; the plan is fsdp=4, so every parameter is split across both
processes, each reads its own half of the data, and the checkpoint is written by both. The
workers run `sanajax.train` itself (the CLI with --coordinator/--num_processes/--process_id),
then restore the checkpoint collectively and print a digest of the gathered parameters: both
processes must print the same.
"""
import os
import re
import socket
import subprocess
import sys

import pytest

from sanajax import config_utils
from sanajax.training import dit as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    "data.resolution": 32, "ae_train.num_steps": 2, "ae_train.batch_size": 4, "ae_train.log_every": 1,
    "model.depth": 2, "model.hidden_size": 64, "train.batch_size": 4, "train.num_steps": 3, "train.log_every": 1,
    "train.checkpoint_every": 3, "train.warmup_steps": 1, "mesh.fsdp": 4,
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("ae")
  config = config_utils.load_config("configs/tiny.py", overrides={**OVERRIDES, "ae.workdir": str(d),
                                                                  "mesh.fsdp": 1})
  train_lib.ensure_ae(config, str(d))
  return d


def test_two_processes_train_checkpoint_and_agree(tmp_path, ae_dir):
  port = free_port()
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"localhost:{port}", str(i), str(workdir),
                             str(ae_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
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
    rows = [l for l in f if '"loss"' in l]
  assert len(rows) == 3, rows
  assert os.path.isdir(workdir / "checkpoints" / "3")


def worker(coordinator: str, process_id: int, workdir: str, ae_dir: str) -> None:
  from sanajax.parallel import distributed
  distributed.initialize(coordinator, 2, process_id)
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from sanajax.parallel import Plan
  from sanajax.training.checkpoint import Checkpointer
  from sanajax.training.optim import build_optimizer
  print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} global devices", flush=True)
  config = config_utils.load_config("configs/tiny.py", overrides={**OVERRIDES, "ae.workdir": ae_dir})
  train_lib.train(config, workdir, run_eval=False)
  # Restore collectively onto the same plan and compare the full parameters across processes.
  plan = Plan.from_config(config)
  tx, _ = build_optimizer(config.train, config.train.num_steps)
  fresh, _, _ = train_lib.init_train_state(config, tx, jax.random.PRNGKey(config.seed), plan)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state, data_state = ckpt.restore(fresh)
  print(f"restored step {int(jax.device_get(state.step))}", flush=True)
  assert data_state["meta"]["process_index"] == process_id, data_state["meta"]
  leaf = state.params["transformer_blocks_0"]["ff"]["conv_inverted"]["kernel"].value
  assert not leaf.is_fully_addressable and leaf.addressable_shards[0].data.shape == (16, 320)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
  assert np.all(np.isfinite(flat))
  print(f"DIGEST {flat.size} {flat.sum():.9e} {np.abs(flat).sum():.9e} {flat[::97].sum():.9e}", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  os.chdir(REPO)
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
