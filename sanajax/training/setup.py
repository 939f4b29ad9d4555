"""Small shared pieces of run set-up: the workdir, the saved config, RNG and dtype names."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

CONFIG_FILE = "config.json"


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates workdir and writes config.json (what sample/eval rebuild the run from).

  A resumed run must use the same config: a changed architecture field would make the
  restore fail later with a much less readable message, so it is checked here.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for section in ("model", "ae", "text"):
      if section in old and section in new and old[section] != new[section]:
        changed = sorted(k for k in set(old[section]) | set(new[section])
                         if old[section].get(k) != new[section].get(k))
        raise ValueError(f"{workdir} holds a run with a different config.{section} (fields {changed}); "
                         f"use a new --workdir or the same config.")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with; a clear error if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no {CONFIG_FILE}: it is not a sanajax training workdir.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def dtype_from_name(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"Unknown dtype {name!r}; expected float32, bfloat16 or float16.") from None


def quiet_library_logs() -> None:
  """CLIs show progress bars and results, not Orbax/absl INFO chatter (--verbosity=0 brings it back)."""
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
