"""The training loop's device prefetch: batches two ahead on the devices, in order, with the data
position of the batch last handed out (so a checkpoint resumes at the right batch)."""
from __future__ import annotations

import jax
import numpy as np

from sanajax.parallel import Plan
from sanajax.training.loop import DevicePrefetch


class _Counter:
  """A data iterator with grain's get_state / set_state: batch i is {"x": [[i, i]]}."""

  def __init__(self, n: int):
    self.i, self.n, self.skipped = 0, n, 3

  def __next__(self):
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return {"x": np.full((1, 2), self.i - 1, np.float32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_prefetch_keeps_order_position_and_sharding():
  plan = Plan.single_device()
  source = _Counter(5)
  it = DevicePrefetch(source, plan.shard_batch, size=2)
  first = next(it)
  assert isinstance(first["x"], jax.Array) and float(first["x"][0, 0]) == 0
  assert source.i == 3  # two more batches are in flight
  assert it.get_state() == {"i": 1}  # ... but the position saved is after the batch handed out
  assert plan.shard_batch(first)["x"] is first["x"]  # already laid out: passed through
  assert it.skipped == 3  # the source's counters stay visible to the loop's metrics
  it.set_state({"i": 1})  # a resume drops the batches in flight
  assert [float(b["x"][0, 0]) for b in it] == [1, 2, 3, 4]
  assert it.get_state() == {"i": 5}
