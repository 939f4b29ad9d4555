"""MMDiT <-> diffusers SD3Transformer2DModel: config.json fields, state-dict names, directories.

    model, params = load_sd3_transformer("stable-diffusion-3.5-medium/transformer")
    v = model.apply({"params": params}, latents, t, context, pooled)   # t = diffusers timestep / 1000
    save_diffusers("out/transformer", model, params)                  # bit-identical float32 round trip

Names: 'transformer_blocks.3.attn.to_out.0.weight' <-> transformer_blocks_3/attn/to_out/kernel,
'ff.net.0.proj' <-> ff/net_0/proj, 'ff.net.2' <-> ff/net_2; Linear weights transpose, the patch
conv (O, I, kh, kw) <-> (kh, kw, I, O), 1-D norm weights <-> scale, pos_embed.pos_embed (the
persistent PE buffer) as is.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict

from sanajax.models import mmdit
from sanajax.models.weights_util import (
  abstract_params,
  diffusers_version,
  set_nested,
  torch_to_numpy,
  write_diffusers_dir,
)
from sanajax.safetensors_io import read_checked_state_dict, read_model_config

CLASS_NAME = "SD3Transformer2DModel"
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_BLOCK_FLAX = re.compile(r"^transformer_blocks_(\d+)$")


def mmdit_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A sanajax `model` ConfigDict (name "mmdit", diffusers' field names) from SD3Transformer2DModel's config.json."""
  qk_norm = cfg.get("qk_norm")
  if qk_norm not in mmdit.QK_NORMS:
    raise NotImplementedError(f"SD3Transformer2DModel with qk_norm={qk_norm!r} is not supported; only None or "
                              f"'rms_norm' (SD3.5).")
  m = ml_collections.ConfigDict()
  m.name = "mmdit"
  for field, default in mmdit.ARCH_FIELDS.items():
    value = cfg.get(field, default)
    if field == "dual_attention_layers":
      value = tuple(int(i) for i in (value or ()))
    elif field == "out_channels":
      value = int(value if value is not None else cfg.get("in_channels", mmdit.ARCH_FIELDS["in_channels"]))
    elif field == "pos_embed_max_size":
      value = int(value) if value else None
    elif field != "qk_norm":
      value = int(value)
    m[field] = value
  heads, head_dim = m.num_attention_heads, m.attention_head_dim
  if m.caption_projection_dim != heads * head_dim:
    raise NotImplementedError(f"caption_projection_dim={m.caption_projection_dim} differs from num_attention_heads x "
                              f"attention_head_dim = {heads * head_dim}; SD3Transformer2DModel cannot run such a "
                              f"config either.")
  m.dtype = dtype
  m.attn_impl = "xla"
  m.joint_attention = "softmax"
  m.remat = "none"
  return m


def mmdit_diffusers_config(model_config: Mapping[str, Any]) -> dict:
  """SD3Transformer2DModel config.json contents for a sanajax `model` config (inverse of the above)."""
  c = {**mmdit.ARCH_FIELDS, **dict(model_config)}
  if c.get("joint_attention", "softmax") != "softmax":
    raise ValueError(f"model.joint_attention={c['joint_attention']!r} has no diffusers counterpart "
                     f"(SD3Transformer2DModel attends with softmax); export a softmax MM-DiT.")
  if c.get("guidance_embeds", False) or float(c.get("timestep_scale", 1.0)) != 1.0:
    raise ValueError("model.guidance_embeds / model.timestep_scale (a Sprint MM-DiT student) have no "
                     "SD3Transformer2DModel counterpart; export the teacher, or sample the student with sanajax.")
  out = {k: c[k] for k in mmdit.ARCH_FIELDS}
  out["dual_attention_layers"] = [int(i) for i in (out["dual_attention_layers"] or ())]
  out["qk_norm"] = out["qk_norm"] or None
  return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers_version(), **out}


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Flax params of MMDiT from a diffusers SD3Transformer2DModel state dict (torch tensors or arrays)."""
  params: dict = {}
  for key, value in state_dict.items():
    arr = torch_to_numpy(value)
    flat = _BLOCK.sub(r"transformer_blocks_\1.", key).replace(".to_out.0.", ".to_out.").replace(
        ".net.0.", ".net_0.").replace(".net.2.", ".net_2.")
    parts = flat.split(".")
    leaf = parts[-1]
    if key == "pos_embed.pos_embed" or leaf == "bias":  # The PE buffer and biases: as they are.
      path, out = parts, arr
    elif leaf == "weight" and arr.ndim == 2:
      path, out = parts[:-1] + ["kernel"], arr.T
    elif leaf == "weight" and arr.ndim == 4:
      path, out = parts[:-1] + ["kernel"], arr.transpose(2, 3, 1, 0)
    elif leaf == "weight" and arr.ndim == 1:
      path, out = parts[:-1] + ["scale"], arr
    else:
      raise KeyError(f"Do not know how to map diffusers key {key!r} of shape {arr.shape}.")
    set_nested(params, path, jnp.asarray(out))
  return params


def state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """The exact inverse of params_from_diffusers_state_dict (arrays, or ShapeDtypeStructs via eval_shape)."""
  out = {}
  for path, value in flatten_dict(nn.unbox(params)).items():
    parts = list(path)
    m = _BLOCK_FLAX.match(parts[0])
    if m:
      parts = ["transformer_blocks", m.group(1)] + parts[1:]
    parts = [{"net_0": "net.0", "net_2": "net.2", "to_out": "to_out.0"}.get(q, q) for q in parts]
    leaf = parts[-1]
    value = jnp.asarray(value)
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
      parts[-1] = "weight"
    elif leaf == "scale":
      parts[-1] = "weight"
    out[".".join(parts)] = value
  return out


def load_sd3_transformer(path: str, dtype: str = "float32", return_config: bool = False):
  """(model, params) of a diffusers SD3Transformer2DModel directory (config.json + weights).

  The model is an `MMDiT` with float32 parameters and compute dtype `dtype`:
  model.apply({"params": params}, latents, t, context, pooled) with latents (B, H, W, C) float32,
  t (B,) = diffusers' `timestep` / 1000, context (B, L, joint_attention_dim), pooled
  (B, pooled_projection_dim) -> (B, H, W, out_channels), as diffusers' forward (NCHW there).
  Weights whose names or shapes differ from what config.json describes are refused, each named.
  With return_config, returns (model, params, model_config ConfigDict).
  """
  cfg = read_model_config(path, CLASS_NAME)
  model_config = mmdit_config_from_diffusers(cfg, dtype=dtype)
  model = mmdit.build_mmdit(model_config)
  want = jax.eval_shape(state_dict_from_params, abstract_params(model, *mmdit.init_args(model_config)))
  state = read_checked_state_dict(path, want)
  params = params_from_diffusers_state_dict(state)
  return (model, params, model_config) if return_config else (model, params)


def model_config_from_module(model: mmdit.MMDiT) -> dict:
  """The `model` config fields of an MMDiT instance (what build_mmdit would rebuild it from)."""
  mc = {f: getattr(model, f) for f in mmdit.ARCH_FIELDS}
  mc["joint_attention"] = model.joint_attention
  mc.update(guidance_embeds=model.guidance_embeds, timestep_scale=model.timestep_scale)
  return mc


def save_diffusers(directory: str, model: mmdit.MMDiT, params: Mapping, dtype: str = "float32") -> None:
  """Writes an MMDiT as a diffusers directory (config.json + diffusion_pytorch_model.safetensors) that
  SD3Transformer2DModel.from_pretrained loads. dtype: float32 (bit-identical round trip), bfloat16 or float16."""
  config = mmdit_diffusers_config(model_config_from_module(model))
  write_diffusers_dir(directory, config, state_dict_from_params(params), dtype)
