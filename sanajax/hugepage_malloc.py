"""glibc's huge-page malloc tunable for the CLIs: XLA:CPU's per-step buffers without a page fault per 4 KiB.

XLA:CPU allocates each step's temporary buffer with malloc; a block that large (the default AE step's:
77.6 MB per device) is over glibc's mmap threshold, so every step maps it fresh and every 4 KiB page of
it faults in again (~40,000 faults per AE step, ~11% of the default run's CPU time). glibc's
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_MAX_ do not change that;
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) does: malloc then advises its mappings to use
transparent huge pages, 512x fewer faults per byte. Measured on the default, whole command, identical
scores: 17 min 9 s -> 15 min 57 s on one machine, 16 min 16 s -> 14 min 12 s on another
(docs/results.md#the-default-run).

glibc reads tunables once, when the process starts, so a CLI that wants them re-executes itself with
the variable set (`reexec_if_main(__name__)` at the top of each CLI module and experiment script, before its
imports: done after them, the imports ran twice, ~1.5 s; sanajax.cli.run calls `reexec_with_hugepage_malloc`
too, for a program that does not). It does nothing where it cannot help or where the user has chosen: GLIBC_TUNABLES
already in the environment (also the way to opt out: `GLIBC_TUNABLES= python -m sanajax.train ...`),
a libc other than glibc >= 2.35, or transparent huge pages switched off (`never`).
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None for another libc (musl, macOS, Windows)."""
  name, version = platform.libc_ver()
  if name != "glibc":
    return None
  try:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"; the bracketed word of
  `path`), or None where the file is absent (not Linux, or a kernel without THP)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def hugepage_environ(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                     thp: str | None) -> dict[str, str] | None:
  """`environ` with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 added, or None where that changes nothing
  or is not ours to change: GLIBC_TUNABLES already set (even empty: the user's choice), glibc older
  than 2.35 or absent (`glibc` None), transparent huge pages off or unknown (`thp` not always/madvise)."""
  if "GLIBC_TUNABLES" in environ or glibc is None or glibc < MIN_GLIBC or thp not in ("always", "madvise"):
    return None
  return {**environ, "GLIBC_TUNABLES": TUNABLE}


def hugepage_environ_here(environ: Mapping[str, str]) -> dict[str, str] | None:
  """hugepage_environ for this machine's glibc and transparent-huge-page mode."""
  return hugepage_environ(environ, glibc_version(), thp_mode())


def reexec_with_hugepage_malloc() -> None:
  """Replaces this process by the same command (same interpreter, flags, -m module, arguments and
  pid) with the tunable in its environment, when hugepage_environ says it helps; otherwise returns.
  Call it first thing in a CLI's start-up: the work done before it is done twice. The new process
  finds GLIBC_TUNABLES set and returns here, so it re-executes at most once."""
  environ = hugepage_environ_here(os.environ)
  if environ is None or not sys.executable or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)


def reexec_if_main(module_name: str) -> None:
  """reexec_with_hugepage_malloc when `module_name` (the caller's __name__) is "__main__", i.e. the module runs
  as the program; a no-op when it is imported. Call it at the top of a CLI module, before its other imports."""
  if module_name == "__main__":
    reexec_with_hugepage_malloc()
