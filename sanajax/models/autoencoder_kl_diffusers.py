"""AutoencoderKL <-> diffusers AutoencoderKL: config.json fields, state-dict names, directories.

    model, params = load_sd3_vae("stable-diffusion-3-medium-diffusers/vae")
    z = model.apply({"params": params}, images, method=model.encode)  # images (B, H, W, 3) in [-1, 1]
    latents = (z - model.shift_factor) * model.scaling_factor         # what the SD3 transformer sees
    save_diffusers("out/vae", model, params)

Names: the DC-AE's rule (list indices folded into the Flax module name; dcae._flax_path and its
inverse dcae_diffusers._torch_key), so the Flax -> diffusers direction IS
dcae_diffusers.dcae_state_dict_from_params (conv kernel (kh, kw, I, O) -> weight (O, I, kh, kw),
dense kernel (I, O) -> weight (O, I), GroupNorm scale -> weight). The other direction walks the
model's own parameter tree, so every tensor it needs is looked up by name and a wrong file is
refused (safetensors_io.check_tensors names each missing, unexpected and mis-shaped tensor).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sanajax.models.autoencoder_kl import (
  CONFIG_FIELDS,
  DOWN_BLOCK_TYPE,
  UP_BLOCK_TYPE,
  AutoencoderKL,
  build_autoencoder_kl,
)
from sanajax.models.dcae_diffusers import _listify, _torch_key, dcae_state_dict_from_params
from sanajax.models.weights_util import abstract_params, diffusers_version, write_diffusers_dir
from sanajax.safetensors_io import check_tensors, read_checked_state_dict, read_model_config, tensor_shapes

CLASS_NAME = "AutoencoderKL"


def autoencoder_kl_config_from_diffusers(cfg: Mapping[str, Any], *,
                                         dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `ae` ConfigDict (autoencoder_kl.CONFIG_FIELDS + dtype) from AutoencoderKL's config.json.

  Fields the file leaves out take diffusers' AutoencoderKL defaults (not SD3's), as from_pretrained
  would; `shift_factor: null` (SD 1.x / XL) becomes 0.0. Raises ValueError naming every field
  sanajax cannot build (block types other than DownEncoderBlock2D / UpDecoderBlock2D).
  """
  defaults = {"in_channels": 3, "out_channels": 3, "block_out_channels": [64], "layers_per_block": 1,
              "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu", "scaling_factor": 0.18215,
              "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True}
  ae = ml_collections.ConfigDict()
  for field in CONFIG_FIELDS:
    ae[field] = _listify(cfg.get(field, defaults[field]))
  ae.shift_factor = float(ae.shift_factor or 0.0)
  ae.scaling_factor = float(ae.scaling_factor)
  n = len(ae.block_out_channels)
  problems = []
  for field, want in (("down_block_types", DOWN_BLOCK_TYPE), ("up_block_types", UP_BLOCK_TYPE)):
    types = list(cfg.get(field, [want] * n))
    if types != [want] * n:
      problems.append(f"{field} {types} (sanajax builds {n} x {want!r}, one per block_out_channels entry)")
  if not isinstance(ae.layers_per_block, int):
    problems.append(f"layers_per_block {ae.layers_per_block!r} (an int)")
  if any(c % ae.norm_num_groups for c in ae.block_out_channels):
    problems.append(f"block_out_channels {ae.block_out_channels} (each a multiple of norm_num_groups "
                    f"{ae.norm_num_groups})")
  if problems:
    raise ValueError(f"AutoencoderKL config not supported: {'; '.join(problems)}.")
  ae.dtype = dtype
  ae.workdir = ""
  return ae


def autoencoder_kl_config_from_module(model: AutoencoderKL) -> ml_collections.ConfigDict:
  """The diffusers fields of an AutoencoderKL instance's `ae` config (what build_autoencoder_kl rebuilds)."""
  return ml_collections.ConfigDict({f: _listify(getattr(model, f)) for f in CONFIG_FIELDS})


def autoencoder_kl_diffusers_config(ae_config: ml_collections.ConfigDict) -> dict:
  """AutoencoderKL config.json contents for a sanajax `ae` config (inverse of ..._config_from_diffusers)."""
  out = {f: _listify(ae_config[f]) for f in CONFIG_FIELDS}
  n = len(out["block_out_channels"])
  return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers_version(),
          "down_block_types": [DOWN_BLOCK_TYPE] * n, "up_block_types": [UP_BLOCK_TYPE] * n, **out}


def _example_images(model: AutoencoderKL) -> jax.ShapeDtypeStruct:
  """The smallest image encode accepts: (1, f, f, in_channels); init traces encoder and decoder."""
  f = model.downsample_factor
  return jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)


def expected_state_dict(model: AutoencoderKL) -> dict[str, jax.ShapeDtypeStruct]:
  """{diffusers key: ShapeDtypeStruct} of the state dict `model` needs (no allocation)."""
  return jax.eval_shape(autoencoder_kl_state_dict_from_params, abstract_params(model, _example_images(model)))


def autoencoder_kl_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """Flax params (boxed or not) -> the diffusers AutoencoderKL state dict (the DC-AE's mapping, see the docstring)."""
  return dcae_state_dict_from_params(params)


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any], model: AutoencoderKL,
                                     source: str = "the AutoencoderKL state dict") -> dict:
  """A diffusers AutoencoderKL state dict (torch tensors or arrays) -> the unboxed float32 params of `model`.

  Raises safetensors_io.WeightsError naming every missing, unexpected and mis-shaped tensor.
  """
  state = {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v) for k, v in
           state_dict.items()}
  check_tensors(tensor_shapes(state), tensor_shapes(expected_state_dict(model)), source)
  params = {}
  for path in flatten_dict(abstract_params(model, _example_images(model))):  # shapes matched by check_tensors
    name = path[-1]
    value = np.asarray(state[_torch_key(path[:-1]) + "." + ("bias" if name == "bias" else "weight")], np.float32)
    if name == "kernel":  # conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O)
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    params[path] = jnp.asarray(value)
  return unflatten_dict(params)


def load_sd3_vae(path: str, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers AutoencoderKL directory (SD3 / SD3.5 `vae/`, or any KL VAE).

  model.apply({"params": params}, images, method=model.encode): images (B, H, W, 3) in [-1, 1]
  -> the posterior mean (B, H/8, W/8, latent_channels), raw (no shift, no scale);
  method=model.decode inverts it. model.scaling_factor / model.shift_factor are the config's
  (SD3: 1.5305 / 0.0609). dtype is the compute dtype (params stay float32).
  With return_config, returns (model, params, ae_config ConfigDict).
  """
  ae_config = autoencoder_kl_config_from_diffusers(read_model_config(path, CLASS_NAME), dtype=dtype)
  model = build_autoencoder_kl(ae_config)
  state = read_checked_state_dict(path, expected_state_dict(model))
  params = params_from_diffusers_state_dict(state, model, path)
  return (model, params, ae_config) if return_config else (model, params)


def save_diffusers(directory: str, model: AutoencoderKL, params: Mapping, dtype: str = "float32") -> None:
  """Writes an AutoencoderKL as a diffusers directory (config.json + diffusion_pytorch_model.safetensors)
  that diffusers' AutoencoderKL.from_pretrained loads. dtype: float32 (bit-identical round trip),
  bfloat16 or float16."""
  config = autoencoder_kl_diffusers_config(autoencoder_kl_config_from_module(model))
  write_diffusers_dir(directory, config, autoencoder_kl_state_dict_from_params(nn.unbox(params)), dtype)
