"""Small shared pieces of run set-up: dtype names and library log levels."""
from __future__ import annotations

import jax.numpy as jnp
from absl import flags, logging


def dtype_from_name(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"Unknown dtype {name!r}; expected float32, bfloat16 or float16.") from None


def quiet_library_logs() -> None:
  """CLIs show progress bars and results, not Orbax/absl INFO chatter (--verbosity=0 brings it back)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
