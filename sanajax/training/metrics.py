"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard events, the terminal.

Only process 0 writes (multi-host runs log once).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
  """Appends one JSON object per logging step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, prefix: str = "", tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.prefix = prefix
    self.path = os.path.join(workdir, f"{prefix}metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import (
          SummaryWriter,  # Imported lazily: only the logging process needs it.
        )
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", prefix.rstrip("_") or "train"))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, float(value), int(step))

  def drop_after(self, step: int) -> int:
    """Drops the rows of metrics.jsonl past `step` (and any unreadable line, e.g. one a kill cut short);
    returns how many went.

    Called on resume with the restored step: the steps a killed run logged after its last checkpoint
    are run (and logged) again, and each step must appear once. The file is rewritten atomically (a
    temporary file renamed over it), so a second kill leaves the old file or the new one, never half.
    TensorBoard's event files are left as they are (its viewer shows the newest value of a step).
    """
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
      return 0
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    print(f"{self.path}: dropped {len(lines) - len(kept)} rows after step {step} (logged by a run that stopped "
          f"before its next checkpoint; they are logged again).", flush=True)
    return len(lines) - len(kept)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 (H, W, 3)."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, np.asarray(image), int(step), dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_metrics(workdir: str, prefix: str = "") -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, oldest first."""
  path = os.path.join(workdir, f"{prefix}metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
