"""config.mesh.cpu_devices: a CPU-only host split into several JAX devices (jax_num_cpu_devices) by the CLIs.

JAX reads the CPU device count once, when its backend starts, so each case runs in a fresh interpreter.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> str:
  """Runs `code` in a fresh interpreter on the CPU backend; returns its stdout (fails the test on an error)."""
  environ = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split()
                                  if "xla_force_host_platform_device_count" not in f) + env.get("XLA_FLAGS", "")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=environ)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_the_tiny_config_runs_data_parallel_over_two_cpu_devices():
  """configs/tiny.py asks for 2 CPU devices and data=-1: its plan splits the batch over both; a second
  request once JAX has started is not applied and says so, naming the field."""
  out = _python(
      "import jax\n"
      "from sanajax import config_utils, parallel\n"
      "config = config_utils.load_config('configs/tiny.py')\n"
      "print('note', parallel.use_cpu_devices(config.mesh))\n"
      "plan = parallel.Plan.from_config(config)\n"
      "print('devices', len(jax.devices()), 'shape', dict(plan.mesh.shape), 'shards', plan.batch_shards())\n"
      "print('again', parallel.use_cpu_devices({'cpu_devices': 3}))\n"
      "print('same', parallel.use_cpu_devices({'cpu_devices': 2}))\n")
  lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
  assert lines["note"] == "None"
  assert lines["devices"] == "2 shape {'data': 2, 'fsdp': 1, 'sequence': 1, 'tensor': 1} shards 2"
  assert lines["again"] == "config.mesh.cpu_devices=3 not applied: JAX had already started with 2 CPU device(s)."
  assert lines["same"] == "None"


def test_xla_flags_device_count_wins_and_zero_keeps_one_device():
  code = ("import jax\nfrom sanajax import parallel\n"
          "print(parallel.use_cpu_devices({'cpu_devices': N}), len(jax.devices()))\n")
  assert _python(code.replace("N", "2"), XLA_FLAGS=" --xla_force_host_platform_device_count=3").split() == ["None", "3"]
  assert _python(code.replace("N", "0")).split() == ["None", "1"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_cpu_device_count_names_the_field(value):
  from sanajax import parallel
  with pytest.raises(ValueError, match=r"config.mesh.cpu_devices=.*must be an integer >= 0"):
    parallel.use_cpu_devices({"cpu_devices": value})


def test_the_train_cli_refuses_a_bad_count_in_one_line():
  r = subprocess.run([sys.executable, "-m", "sanajax.train", "--config=configs/tiny.py", "--workdir=/nonexistent/x",
                      "--config.mesh.cpu_devices=-2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr[-2000:]
  assert "config.mesh.cpu_devices=-2" in r.stderr and "Traceback" not in r.stderr
