"""One writer per workdir: WORKDIR/.lock names the run that trains in it.

Two training runs on one workdir interleave metrics.jsonl and overwrite each other's
checkpoints, so a trainer takes the lock before any work (before the AE stage and any
compile), and a second run refuses at once, naming the holder:

    with hold_workdir(workdir):   # or a plain `hold_workdir(workdir)`: held until the process exits
      ...train...

or through sanajax.training.guard's `@guarded(kind)` on a trainer `def train(config, workdir, ...)`.

The lock file is JSON {"host", "pid", "started" (local ISO time), "proc_start", "token"}. It is
created atomically (written to a temporary file, then hard-linked to .lock, which fails if one
exists), so a reader never sees half a record. A lock whose process is gone is stale and is taken
over with a warning: on this host when its pid is not alive (or the pid now belongs to a process
started later: /proc's start time differs); a lock held from another host cannot be checked and
refuses with the fix (delete WORKDIR/.lock once that run is gone).

Only process 0 of a multi-host job holds it (the others write nothing the lock protects alone).
Within one process it is reentrant: train() holds it, and run_from_config, which every trainer
passes through, takes it again (for callers of the loop that do not). Sampling and evaluation
only read a workdir and take no lock.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
import uuid
import warnings
from typing import Self, TypeVar

import jax

LOCK_FILE = ".lock"
T = TypeVar("T")


class WorkdirLockedError(RuntimeError):
  """Raised when another live run holds the workdir."""


class WorkdirLock:
  """A held WORKDIR/.lock (reentrant in this process); a context manager that releases one hold on exit.

  Built by hold_workdir, which takes the lock (or a further hold of it) when called.
  """

  def __init__(self, path: str, token: str | None):
    self.path = path
    self.token = token  # None: this process does not hold a file (multi-host, process > 0)
    self.count = 0

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    """Drops one hold; the last removes the lock file (only if it is still this process's record)."""
    if self.count <= 0:
      return
    self.count -= 1
    if self.count:
      return
    _HELD.pop(self.path, None)
    if self.token is None:
      return
    holder = _read(self.path)
    if holder is not None and holder.get("token") == self.token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass


_HELD: dict[str, WorkdirLock] = {}  # lock path -> this process's lock on it


def hold_workdir(workdir: str) -> WorkdirLock:
  """Takes WORKDIR/.lock for this process (creating workdir) and returns the lock.

  Call it first thing in a trainer. Used as a context manager it is released when the block
  exits (normally or by an exception); called plainly it is held until release() or the
  process exits (atexit). Raises WorkdirLockedError naming the holder (host, pid, start time)
  if another live run holds it; a stale lock (dead pid on this host) is taken over with a warning.
  """
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  lock = _HELD.get(path)
  if lock is None:
    lock = WorkdirLock(path, _acquire(path) if jax.process_index() == 0 else None)
    _HELD[path] = lock
  lock.count += 1
  return lock


def _acquire(path: str) -> str:
  """Creates the lock file at path (taking over a stale one); returns this hold's token."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  token = uuid.uuid4().hex
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "proc_start": _process_start(os.getpid()), "token": token}
  with _guard(os.path.dirname(path)):
    for _ in range(3):  # a lock released or taken over meanwhile costs one more try
      if _create(path, record):
        return token
      holder = _read(path)
      if holder is None:
        continue  # released between our create and read
      reason = _stale_reason(holder)
      if reason is None:
        raise WorkdirLockedError(
            f"{os.path.dirname(path)} is in use by another run: {_describe(holder)}. Wait for it to finish, "
            f"or use another --workdir" + ("" if holder.get("host") == socket.gethostname() else
                                            f" (if that run is gone, delete {path})") + ".")
      warnings.warn(f"Taking over the stale lock {path} ({reason}).", stacklevel=3)
      if _read(path) == holder:  # only the record judged stale: a starter that took it over first keeps its own
        _remove_quietly(path)
  raise WorkdirLockedError(f"Could not take the lock {path}: other runs keep starting on this workdir.")


@contextlib.contextmanager
def _guard(directory: str):
  """flock(2) on the workdir itself while the lock is checked and taken, so two starters that both find a
  stale lock cannot both take it over. Best effort: where the filesystem has no flock it is skipped (the
  atomic create still keeps two fresh starters apart)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # closing the descriptor drops the flock


def _create(path: str, record: dict) -> bool:
  """Writes record to path unless path exists (atomic: link(2) of a complete temporary file)."""
  tmp = f"{path}.{record['pid']}.{record['token'][:8]}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links here (some network / FUSE filesystems): O_EXCL, a reader may see it half-written
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    return True
  finally:
    os.remove(tmp)


def _read(path: str) -> dict | None:
  """The lock's record; {} for a damaged file; None if there is none. A file that does not parse but
  was written in the last 2 s may be being written (the O_EXCL fallback of _create): read again."""
  for _ in range(40):
    try:
      with open(path) as f:
        record = json.load(f)
      return record if isinstance(record, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      try:
        if time.time() - os.path.getmtime(path) > 2.0:
          return {}
      except OSError:
        return None
      time.sleep(0.1)
  return {}


def _stale_reason(holder: dict | None) -> str | None:
  """Why the lock record is stale (its run is certainly gone), or None if it may be live."""
  if holder is None:
    return None
  if not holder or "pid" not in holder:
    return "unreadable lock file"
  if holder.get("host") != socket.gethostname():
    return None  # another machine's process: its liveness cannot be checked from here
  pid = int(holder["pid"])
  if pid == os.getpid():
    return f"left by an earlier process with this pid {pid}"  # this process's own holds are in _HELD
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return f"pid {pid} on {holder['host']} is not running"
  except PermissionError:
    pass  # alive, another user's
  started = holder.get("proc_start")
  if started is not None and _process_start(pid) not in (None, started):
    return f"pid {pid} now belongs to a newer process"
  return None


def _describe(holder: dict) -> str:
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _process_start(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None off Linux."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


@atexit.register
def _release_all() -> None:
  """Removes this process's lock files at exit (a plain hold_workdir call, or an exception that ends the run)."""
  for lock in list(_HELD.values()):
    lock.count = 1
    lock.release()
