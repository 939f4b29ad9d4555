"""WORKDIR/loss.png: the run's loss curve, drawn from metrics.jsonl at the end of every run."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # Files only: no display on training machines.
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

LOSS_PLOT_FILE = "loss.png"


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over `window` points (shorter at the start), same length as `values`."""
  c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
  n = np.arange(1, len(values) + 1)
  lo = np.maximum(n - window, 0)
  return (c[n] - c[lo]) / (n - lo)


def write_loss_plot(rows: list[dict], path: str, *, title: str = "") -> str | None:
  """Plots the "loss" of metric rows ({"step", "loss", ...}) against step, raw and smoothed over
  ~5% of the points; returns the path, or None when no row has a loss."""
  points = sorted((int(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "step" in r)
  if not points:
    return None
  steps, losses = (np.array(v) for v in zip(*points))
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
  ax.plot(steps, losses, color="0.75", linewidth=0.8, label="loss")
  if len(points) >= 10:
    ax.plot(steps, smooth(losses, max(2, len(points) // 20)), color="C0", linewidth=1.5, label="smoothed")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
