"""Parameter-tree helpers shared by the weight mappings (sana_dit_diffusers, dcae_diffusers,
gemma2_transformers) and the workdir loaders: abstract trees, boxes, flat names, diffusers dirs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from sanajax.dtypes import dtype_from_name
from sanajax.safetensors_io import write_safetensors


def boxed_abstract_params(model: nn.Module, *args) -> dict:
  """ShapeDtypeStructs of model.init(key, *args)["params"], with their nn.Partitioned boxes (no allocation)."""
  return jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *args)["params"]


def abstract_params(model: nn.Module, *args) -> dict:
  """Unboxed ShapeDtypeStructs of model.init(key, *args)["params"] (no allocation)."""
  return nn.unbox(boxed_abstract_params(model, *args))


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def put_like(like: Any, params: Any) -> Any:
  """Unboxed `params` put into the structure of `like`: nn.Partitioned boxes (as model.init returns
  them, and as the trainers save them) and shardings where `like` has them; values float32."""
  def put(box, value):
    if _is_box(box):
      return box.replace_boxed(put(box.value, value))
    return jax.device_put(jnp.asarray(value, jnp.float32), getattr(box, "sharding", None))
  return jax.tree.map(put, like, params, is_leaf=_is_box)


def flat_names(tree: Any) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a (possibly boxed) params tree."""
  return flatten_dict(nn.unbox(tree), sep="/")


def diffusers_version() -> str:
  """The installed diffusers' version for an exported config.json, else the first with SANA's classes."""
  try:
    import diffusers  # Optional heavy dependency, only to stamp the version; exports work without it.
    return diffusers.__version__
  except ImportError:
    return "0.32.0"  # The first diffusers with SanaTransformer2DModel and AutoencoderDC.


def write_diffusers_dir(directory: str, config: Mapping[str, Any], state: Mapping[str, Any],
                        dtype: str = "float32") -> None:
  """A diffusers model directory: config.json + diffusion_pytorch_model.safetensors of `state`
  (arrays of any float dtype) written as `dtype` (float32, bfloat16 or float16)."""
  np_dtype = np.dtype(dtype_from_name(dtype, "the export dtype"))  # bfloat16: ml_dtypes', a numpy dtype.
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, "diffusion_pytorch_model.safetensors"),
                    {k: np.asarray(v, np.float32).astype(np_dtype) for k, v in state.items()})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def torch_to_numpy(value: Any) -> np.ndarray:
  """A state-dict entry (torch tensor or array-like) as a float32 numpy array."""
  return np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, np.float32)


def set_nested(tree: dict, path: list[str], value: Any) -> None:
  """tree[path[0]][path[1]]...[path[-1]] = value, creating the dicts on the way."""
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value
