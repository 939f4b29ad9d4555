"""DCAE <-> diffusers AutoencoderDC: config.json fields, state-dict names, directories.

    model, params = load_dcae("Sana_1600M_1024px_diffusers/vae")
    z = model.apply({"params": params}, images, method=model.encode)   # images (B, H, W, 3) in [-1, 1]
    save_diffusers("out/vae", model, params)

The state-dict direction diffusers -> Flax is dcae.params_from_diffusers_state_dict (beside the
model); this module holds its inverse and the config mapping.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict

from sanajax.models import dcae
from sanajax.models.weights_util import abstract_params, diffusers_version, write_diffusers_dir
from sanajax.safetensors_io import read_checked_state_dict, read_model_config

# The `ae` config fields that are AutoencoderDC's constructor arguments; attn_eps is sanajax's
# own (diffusers hard-codes SanaMultiscaleLinearAttention's 1e-15, dcae.ATTN_EPS).
_DIFFUSERS_FIELDS = dcae.CONFIG_FIELDS + tuple(f for f in dcae.OPTIONAL_FIELDS if f != "attn_eps")


def dcae_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `ae` ConfigDict (fields of configs/dcae_f32c32.py) from AutoencoderDC's config.json;
  fields the file leaves out take DCAE's defaults."""
  defaults = {k: v.default for k, v in inspect.signature(dcae.DCAE).parameters.items()}
  ae = ml_collections.ConfigDict()
  for field in _DIFFUSERS_FIELDS:
    ae[field] = _listify(cfg.get(field, defaults.get(field)))
  ae.attn_eps = dcae.ATTN_EPS
  ae.dtype = dtype
  ae.attn_impl = "xla"
  ae.workdir = ""
  return ae


def dcae_config_from_module(model: dcae.DCAE) -> ml_collections.ConfigDict:
  """The diffusers fields of a DCAE instance's `ae` config (what build_dcae rebuilds it from)."""
  return ml_collections.ConfigDict({f: _listify(getattr(model, f)) for f in _DIFFUSERS_FIELDS})


def dcae_diffusers_config(ae_config: ml_collections.ConfigDict) -> dict:
  """AutoencoderDC config.json contents for a sanajax `ae` config (inverse of dcae_config_from_diffusers)."""
  return {"_class_name": "AutoencoderDC", "_diffusers_version": diffusers_version(),
          **_listify(dcae.diffusers_kwargs(ae_config))}


def _listify(value):
  """Nested tuples (DCAE fields, frozen to stay hashable) -> lists, as JSON and ConfigDicts hold them."""
  if isinstance(value, (list, tuple)):
    return [_listify(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _listify(v) for k, v in value.items()}
  return value


def _torch_key(path: tuple[str, ...]) -> str:
  """('encoder', 'down_blocks_3_1', 'attn', 'to_qkv_multiscale_0', 'proj_in') -> 'encoder.down_blocks.3.1...'.

  Inverse of the naming in dcae.params_from_diffusers_state_dict: trailing '_<digits>' groups of a
  name are list indices.
  """
  parts = []
  for name in path:
    pieces = name.split("_")
    i = len(pieces)
    while i > 1 and pieces[i - 1].isdigit():
      i -= 1
    parts.append("_".join(pieces[:i]))
    parts.extend(pieces[i:])
  return ".".join(parts)


def dcae_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """The exact inverse of dcae.params_from_diffusers_state_dict (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, value in flatten_dict(nn.unbox(params)).items():
    leaf, value = path[-1], jnp.asarray(value)
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[_torch_key(path[:-1]) + "." + leaf] = value
  return out


def load_dcae(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers AutoencoderDC directory.

  model.apply({"params": params}, images, method=model.encode): images (B, H, W, 3) in [-1, 1]
  -> raw latent (B, H/f, W/f, latent_channels) (no scaling factor); method=model.decode inverts
  it. model.scaling_factor is the config's (0.41407 for the released f32c32).
  With return_config, returns (model, params, ae_config ConfigDict).
  """
  cfg = read_model_config(path, "AutoencoderDC")
  ae_config = dcae_config_from_diffusers(cfg, dtype=dtype)
  model = dcae.build_dcae(ae_config)
  f = dcae.downsample_factor(ae_config)
  want = jax.eval_shape(dcae_state_dict_from_params,
                        abstract_params(model, jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)))
  state = read_checked_state_dict(path, want)
  params = dcae.params_from_diffusers_state_dict(state, ae_config)
  return (model, params, ae_config) if return_config else (model, params)


def save_diffusers(directory: str, model: dcae.DCAE, params: Mapping, *, dtype: str = "float32") -> None:
  """Writes a DCAE as a diffusers directory (config.json + diffusion_pytorch_model.safetensors) that
  AutoencoderDC.from_pretrained loads. dtype: float32 (bit-identical round trip), bfloat16 or float16."""
  config = dcae_diffusers_config(dcae_config_from_module(model))
  write_diffusers_dir(directory, config, dcae_state_dict_from_params(params), dtype)
