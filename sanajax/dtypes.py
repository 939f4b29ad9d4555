"""The one map from config dtype names to JAX dtypes (model.dtype, text.dtype, distill.teacher_dtype, ...).

Foundation layer: imports nothing else of sanajax. Activations are computed in the named dtype; parameters stay
float32 (see sanajax.models.layers).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

# The names a config may give; the values are the jnp scalar types (np.dtype(v) works on each, bfloat16 via
# ml_dtypes).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str, what: str = "dtype") -> Any:
  """The jnp dtype called `name` ("float32", "bfloat16" or "float16").

  `what` names the config field in the error, e.g. dtype_from_name(c.dtype, "model.dtype") raises
  "model.dtype must be one of ['bfloat16', 'float16', 'float32'], got 'fp8'."
  """
  try:
    return DTYPES[name]
  except (KeyError, TypeError):  # TypeError: an unhashable value (a list) from a bad override.
    raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}.") from None
