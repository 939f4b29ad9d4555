"""Processes seen through /proc (Linux): whose child a process is, and waiting for processes to end."""
import os
import time


def parent_and_state(pid: int) -> tuple[int | None, str | None]:
  """(parent pid, state letter) of a process from /proc/PID/stat; (None, None) once it is gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None, None
  fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "
  return int(fields[1]), fields[0]


def children_of(pid: int) -> list[int]:
  return [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_and_state(int(p))[0] == pid]


def wait_until_gone(pids, timeout: float, what: str) -> None:
  """Asserts that every pid has exited (gone, or a zombie nobody reaped yet) within `timeout` seconds."""
  deadline = time.time() + timeout
  while alive := [p for p in pids if parent_and_state(p)[1] not in (None, "Z")]:
    assert time.time() < deadline, f"{what} still running after {timeout:.0f} s: {alive}"
    time.sleep(0.2)
