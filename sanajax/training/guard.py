"""What every trainer does before any work: check the whole config, then take the workdir's lock.

    @guarded("dit")
    def train(config, workdir, ...): ...

The order matters: a bad config is refused with every bad field named (config_check.ConfigError)
before anything is written, so it leaves no workdir or lock behind; a workdir another run holds is
refused (workdir.lock.WorkdirLockedError) before config.json is rewritten or anything compiles.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, TypeVar

from sanajax.config_check import validate_config
from sanajax.workdir.lock import hold_workdir

T = TypeVar("T")


def guarded(kind: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
  """Decorator for a trainer fn(config, workdir, ...) of `kind` ("dit" | "ae" | "sprint")."""
  def decorate(fn: Callable[..., T]) -> Callable[..., T]:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      bound = signature.bind(*args, **kwargs).arguments
      validate_config(bound["config"], kind)
      with hold_workdir(bound["workdir"]):
        return fn(*args, **kwargs)
    return wrapper
  return decorate
