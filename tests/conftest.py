import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_env  # noqa: E402  (tests/xla_env.py)

from sanajax import hugepage_malloc  # noqa: E402  (no jax: it must start after the variables below)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before any test starts jax's backend: XLA_FLAGS is read when the CPU client is created, and the
# xdist workers and every subprocess inherit it. Why and what it costs: tests/xla_env.py.
os.environ["XLA_FLAGS"] = xla_env.with_fast_compile(os.environ.get("XLA_FLAGS", ""))
# glibc's huge-page malloc tunable, as the CLIs set it for themselves (sanajax/hugepage_malloc.py): the
# xdist workers start after this and inherit it (XLA:CPU's per-step buffers stop faulting in page by
# page), and the CLI subprocesses find it set, so they do not re-execute themselves. Five CLI-heavy files,
# two interleaved pairs (2026-12-07): 152 / 145 s with it, 162 / 149 s without.
os.environ.update(hugepage_malloc.hugepage_environ_here(os.environ) or {})


# The longest files, longest first (measured 2026-12-02, `--durations`, 2 xdist workers on the
# 2-core CI machine: test_learning 678 s, test_sprint_distill 298, test_parallel 264, test_training
# 179, test_sprint_ablation 159, test_parallel_sprint 131; test_notebooks 84 s alone on 2026-12-03;
# everything else < 70 s). xdist's
# loadfile hands out whole files in collection order; started last, the longest file alone sets
# the wall time, so these are collected first and the short files fill in around them.
# Added 2026-12-06 from single-file runs on loaded cores: test_controlnet_cli ~600 s (it trains its base),
# test_mission_data ~600, test_cache ~500, test_benchmarks ~160, test_serve ~110, test_sd3_finetune ~220,
# test_scan_layers ~95 s, test_sprint_mmdit ~125 s of CPU.
LONGEST_FIRST = ("test_learning.py", "test_controlnet_cli.py", "test_mission_data.py", "test_cache.py",
                 "test_sprint_distill.py", "test_parallel.py", "test_training.py", "test_sprint_ablation.py",
                 "test_parallel_sprint.py", "test_sd3_finetune.py", "test_notebooks.py", "test_benchmarks.py",
                 "test_cli.py", "test_serve.py", "test_scan_layers.py", "test_mmdit_training.py",
                 "test_sd3_pipeline.py", "test_mmdit.py", "test_sprint_mmdit.py")


# Files marked `slow` (each over ~2 minutes on the 2-core machine: they train, distil or run the
# 8-device and notebook scripts). `pytest -m "not slow"` is the quick suite (README "Tests"); CI runs all.
SLOW_FILES = ("test_learning.py", "test_sprint_distill.py", "test_parallel.py", "test_sprint_ablation.py",
              "test_parallel_sprint.py", "test_notebooks.py", "test_mission_data.py", "test_cache.py",
              "test_controlnet_cli.py", "test_sprint_mmdit.py")


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory):
  """The AE workdir the DiT training tests share, trained once per run (tests/tiny_base.py)."""
  import tiny_base  # here, not above: it imports jax, which must start after JAX_PLATFORMS and XLA_FLAGS are set
  return tiny_base.trained_ae(tiny_base.run_dir(tmp_path_factory))


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
  for item in items:
    if item.path.name in SLOW_FILES:
      item.add_marker(pytest.mark.slow)


def pytest_configure(config):
  """One persistent XLA compilation cache per test run, shared by the xdist workers and every
  subprocess the tests start (CLIs, the 8-device and multi-host scripts), removed at the end.

  Why: most of the suite's time is XLA compiling on 2 cores, and many tests compile the same
  program again from a new function object (train() / distill() called several times for resume
  tests, CLI subprocesses sampling a workdir a test just trained), which jit's in-memory cache
  cannot see. The cache is keyed by the program, compile options, XLA_FLAGS and jax version, so a
  hit is the executable a fresh compile would give. Every program is stored, also those compiling in
  under jax's 1 s floor (jax_persistent_cache_min_compile_time_secs = 0): under FAST_COMPILE most of the
  suite's programs are that small, and each CLI subprocess compiles them again (five CLI-heavy files,
  2026-12-07, two interleaved pairs: 151 and 153 s with the floor, 146 and 146 s without). A run that sets
  JAX_COMPILATION_CACHE_DIR keeps its own; JAX_ENABLE_COMPILATION_CACHE=false turns it off.
  """
  config.addinivalue_line("markers", "slow: a test file over ~2 minutes on 2 cores (quick suite: -m 'not slow')")
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # xdist would reorder files by test count; keep LONGEST_FIRST
  if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # xdist workers inherit the controller's environment (they start after this hook).
  path = tempfile.mkdtemp(prefix="sanajax-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  config._sanajax_jax_cache = path
  if "jax" in sys.modules:  # jax reads the variables at import; a plugin may have imported it already.
    sys.modules["jax"].config.update("jax_compilation_cache_dir", path)
    sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs",
                                     float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  path = getattr(config, "_sanajax_jax_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
