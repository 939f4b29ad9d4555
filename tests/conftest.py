import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
  """One persistent XLA compilation cache per test run, shared by the xdist workers and every
  subprocess the tests start (CLIs, the 8-device and multi-host scripts), removed at the end.

  Why: most of the suite's time is XLA compiling on 2 cores, and many tests compile the same
  program again from a new function object (train() / distill() called several times for resume
  tests, CLI subprocesses sampling a workdir a test just trained), which jit's in-memory cache
  cannot see. The cache is keyed by the program, compile options, XLA_FLAGS and jax version, so a
  hit is the executable a fresh compile would give. Programs compiling in under a second
  (jax_persistent_cache_min_compile_time_secs) are not stored. A run that sets
  JAX_COMPILATION_CACHE_DIR keeps its own; JAX_ENABLE_COMPILATION_CACHE=false turns it off.
  """
  if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # xdist workers inherit the controller's environment (they start after this hook).
  path = tempfile.mkdtemp(prefix="sanajax-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  config._sanajax_jax_cache = path
  if "jax" in sys.modules:  # jax reads the variable at import; a plugin may have imported it already.
    sys.modules["jax"].config.update("jax_compilation_cache_dir", path)


def pytest_unconfigure(config):
  path = getattr(config, "_sanajax_jax_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
