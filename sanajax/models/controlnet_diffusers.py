"""SanaControlNet <-> diffusers SanaControlNetModel: config.json fields, state-dict names, directories.

    model, params = load_sana_controlnet("Sana_600M_1024px_ControlNetPlus_diffusers/controlnet")
    residuals = model.apply({"params": params}, latents, t, context, mask, control_latents)
    save_diffusers("out/controlnet", model, params)   # bit-identical float32 round trip

The names are SanaDiT's (sana_dit_diffusers) plus `input_block` and `controlnet_blocks.{k}` (h x h
Linears), so both directions reuse the DiT's mapping with the ControlNet blocks renamed.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import ml_collections

from sanajax.models import controlnet as controlnet_lib
from sanajax.models import sana_dit, sana_dit_diffusers
from sanajax.models.weights_util import abstract_params, diffusers_version, write_diffusers_dir
from sanajax.safetensors_io import read_checked_state_dict, read_model_config

CLASS_NAME = "SanaControlNetModel"
# SanaTransformer2DModel fields SanaControlNetModel does not have (its time embedding is adaLN-single).
_DIT_ONLY = ("qk_norm", "guidance_embeds", "guidance_embeds_scale", "timestep_scale")
_TORCH_BLOCK = re.compile(r"^controlnet_blocks\.(\d+)\.")
_FLAX_BLOCK = re.compile(r"^controlnet_blocks_(\d+)\.")


def controlnet_diffusers_config(model_config: Mapping[str, Any], num_layers: int) -> dict:
  """SanaControlNetModel config.json contents for a ControlNet of `num_layers` blocks on a `model` config."""
  kw = sana_dit.diffusers_kwargs(model_config)
  for field in _DIT_ONLY:
    kw.pop(field, None)
  kw["num_layers"] = int(num_layers)
  return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers_version(), **kw}


def controlnet_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32"
                                     ) -> tuple[ml_collections.ConfigDict, int]:
  """(sanajax `model` ConfigDict of the copied DiT layout, num_layers) from SanaControlNetModel's config.json."""
  model_config = sana_dit_diffusers.sana_config_from_diffusers(dict(cfg), dtype=dtype)
  return model_config, int(cfg.get("num_layers", 7))


def controlnet_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """Flax params -> SanaControlNetModel state dict (the DiT's rule; controlnet_blocks_k -> controlnet_blocks.k)."""
  state = sana_dit_diffusers.dit_state_dict_from_params(params)
  return {_FLAX_BLOCK.sub(r"controlnet_blocks.\1.", k): v for k, v in state.items()}


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """SanaControlNetModel state dict (tensors or arrays) -> SanaControlNet Flax params."""
  renamed = {_TORCH_BLOCK.sub(r"controlnet_blocks_\1.", k): v for k, v in state_dict.items()}
  return sana_dit.params_from_diffusers_state_dict(renamed)


def load_sana_controlnet(path: str, *, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers SanaControlNetModel directory (config.json + weights), or of a
  SanaControlNetPipeline directory (its controlnet/ folder).

  model.apply({"params": params}, latents, t, context, context_mask, control, conditioning_scale=s)
  -> num_layers residuals (B, H/p * W/p, h) for SanaDiT's controlnet_residuals=; t is diffusers'
  `timestep` / 1000, control the DC-AE latents of the control image times the AE's scaling factor.
  With return_config, returns (model, params, model_config, num_layers).
  """
  if os.path.exists(os.path.join(path, "controlnet", "config.json")):
    path = os.path.join(path, "controlnet")
  cfg = read_model_config(path, CLASS_NAME)
  model_config, num_layers = controlnet_config_from_diffusers(cfg, dtype=dtype)
  model = controlnet_lib.build_controlnet(model_config, num_layers, check_depth=False)
  want = jax.eval_shape(controlnet_state_dict_from_params,
                        abstract_params(model, *controlnet_lib.init_args(model_config)))
  params = params_from_diffusers_state_dict(read_checked_state_dict(path, want))
  return (model, params, model_config, num_layers) if return_config else (model, params)


def save_diffusers(directory: str, model_config: Mapping[str, Any], num_layers: int, params: Mapping, *,
                   dtype: str = "float32") -> None:
  """Writes a ControlNet (params of build_controlnet(model_config, num_layers)) as a diffusers directory
  that SanaControlNetModel.from_pretrained loads. dtype: float32 (bit-identical), bfloat16 or float16."""
  write_diffusers_dir(directory, controlnet_diffusers_config(model_config, num_layers),
                      controlnet_state_dict_from_params(params), dtype)
