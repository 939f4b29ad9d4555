"""Worker processes (grain's, data.build's pool) that end with the process that started them.

A process killed outright (SIGKILL, the OOM killer) cannot stop its workers, and Python's `spawn`
workers do not notice: each waits on a queue whose other end is gone, forever. So every worker
watches its parent:

    exit_with_parent(parent_pid)   # in the worker's initializer; parent_pid = os.getpid() of the parent
"""
from __future__ import annotations

import os
import threading
import time

PARENT_POLL_S = 1.0  # how soon a worker notices that its parent is gone


def exit_with_parent(parent_pid: int) -> None:
  """Exits this process (os._exit(1), from a daemon thread) within PARENT_POLL_S of its parent `parent_pid` ending.
  At once when the parent is already gone (the worker is then another process's child, e.g. init's)."""
  def watch() -> None:
    while os.getppid() == parent_pid:
      time.sleep(PARENT_POLL_S)
    os._exit(1)
  threading.Thread(target=watch, name=f"exit-with-parent-{parent_pid}", daemon=True).start()
