"""Subprocess environments held to one set of installed distributions (tests/held_site/sitecustomize.py)."""
import os
import pathlib
import sys

HELD_SITE = pathlib.Path(__file__).resolve().parent / "held_site"


def held_env(name: str, env: dict | None = None) -> dict:
  """`env` (default os.environ) for a subprocess that sees only the HELD_SITE=name distributions:
  "install" (what `pip install -e .` installs) or "gpu_image" (the lent GPU image plus the carried wheels).
  PYTHON names this interpreter, for scripts that start their own (benchmarks/run_all.sh)."""
  env = dict(os.environ if env is None else env)
  return {**env, "HELD_SITE": name, "PYTHON": sys.executable,
          "PYTHONPATH": os.pathsep.join(filter(None, [str(HELD_SITE), env.get("PYTHONPATH")]))}
