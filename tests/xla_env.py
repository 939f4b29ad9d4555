"""XLA:CPU flags of the test suite (tests/conftest.py sets them for every test process).

Most of the suite's time is XLA compiling small programs that then run a few steps, and LLVM's
optimisation passes are most of that compile time. Measured on the 2-core CI machine, alone:
tests/test_sprint_distill.py + tests/test_training.py take 556 s at XLA's default level and
393 s with FAST_COMPILE. Matmuls and convolutions call precompiled Eigen / oneDNN kernels either
way, but fused elementwise code runs slower unoptimised (the tiny DiT train step 0.23 -> 0.55 s,
the tiny AE's 0.63 -> 0.93 s), so the tests that measure learning over hundreds of steps run
their training in a subprocess with `full_optimisation_env()`.

Every comparison in the suite is between programs compiled under the same flags (the CLI
subprocesses inherit them), and the compilation cache is keyed by XLA_FLAGS.
"""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_fast_compile(flags: str) -> str:
  """XLA_FLAGS plus FAST_COMPILE, unless the flags already choose an optimisation level."""
  if "xla_backend_optimization_level" in flags:
    return flags
  return f"{flags} {FAST_COMPILE}".strip()


def full_optimisation_env(**extra: str) -> dict:
  """os.environ for a subprocess that compiles at XLA's default optimisation level (FAST_COMPILE removed)."""
  flags = " ".join(os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").split())
  env = {**os.environ, **extra}
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env
