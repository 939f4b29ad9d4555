"""What several test files share, built once per test run: the trained tiny AE of the DiT training tests
(tests/conftest.py's `tiny_ae` fixture); build_once also serves tests/sd3_helpers.converted_sd3.

tests/test_training.py, test_workdir.py, test_cache.py, test_lora_training.py, test_controlnet_cli.py, test_cli.py
and test_sprint_distill.py need a DiT config's AE at 32 px: tests/small_configs.py's ResBlock AE trained 2 steps
(`ensure_ae`, as `train` does when the AE workdir is empty). Training it compiles the AE's train step and
evaluation (~15 s of an idle core, each time), so it is trained once per test run, not once per file: in a folder
of the run's base temp dir that the xdist workers share (keyed by a hash of the overrides), under a file lock, so a
second worker waits for the first and reuses its AE. Nothing the tests check depends on which file trained it:
they read it (Checkpointer read_only), never write it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator

from small_configs import SMALLEST_MODEL  # tests/small_configs.py (tests/ is on sys.path)

from sanajax import config_utils
from sanajax.training import dit as train_lib

# configs/tiny.py shrunk for the AE every training test uses: 32 px, tests/small_configs.py's model, 2 AE steps.
AE_OVERRIDES = {"data.resolution": 32, "ae_train.num_steps": 2, "ae_train.batch_size": 4, "ae_train.log_every": 1,
                **SMALLEST_MODEL}
DONE = "built.json"  # written last: a folder without it is a build that died (rebuilt)


def run_dir(tmp_path_factory) -> str:
  """The folder this test run's xdist workers share: the parent of a worker's base temp dir (pytest's
  per-run pytest-N), or the base temp dir itself without xdist. A new run gets a new one, so nothing built
  by older code is reused."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes (also when this process dies)
    yield


def build_once(root: str, name: str, key: dict, build: Callable[[str], None]) -> str:
  """root/<name>-<hash of key>: build(path) runs there once per run; other callers (other xdist workers)
  wait on the lock and get the finished folder."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(root, f"{name}-{digest}")
  with _locked(path + ".lock"):
    if not os.path.exists(os.path.join(path, DONE)):
      shutil.rmtree(path, ignore_errors=True)
      os.makedirs(path)
      build(path)
      with open(os.path.join(path, DONE), "w") as f:
        json.dump(key, f)
  return path


def trained_ae(root: str) -> str:
  """The AE workdir of AE_OVERRIDES (configs/tiny.py's AE section at small_configs' sizes), trained 2 steps."""
  def build(path):
    config = config_utils.load_config("configs/tiny.py", overrides={**AE_OVERRIDES, "ae.workdir": path})
    train_lib.ensure_ae(config, path)

  return build_once(root, "ae", AE_OVERRIDES, build)
