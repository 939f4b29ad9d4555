"""The active sharding plan, read by model code at trace time (no jax or model imports here).

Models call `active_plan()` where a plan changes what they compute (sequence-parallel linear
attention and the Mix-FFN conv halo) or where activations get sharding constraints. Outside
`with plan.activate():` it is None and single-device code runs exactly as written.
"""
from __future__ import annotations

import contextlib
import threading

_STATE = threading.local()


def active_plan():
  """The `sanajax.parallel.Plan` being traced under, or None."""
  return getattr(_STATE, "plan", None)


@contextlib.contextmanager
def use_plan(plan):
  """Makes `plan` active for the code traced inside the block (nests; restores on exit)."""
  previous = active_plan()
  _STATE.plan = plan
  try:
    yield plan
  finally:
    _STATE.plan = previous
