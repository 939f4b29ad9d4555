"""SanaDiT <-> diffusers SanaTransformer2DModel: config.json fields, state-dict names, directories.

    model, params = load_sana_transformer("Sana_1600M_1024px_diffusers/transformer")
    v = model.apply({"params": params}, latents, t, context, context_mask)
    save_diffusers("out/transformer", model, params)   # bit-identical float32 round trip
    model, params = load_sana_transformer(path, scan_layers=True)   # stacked blocks (model.scan_layers)

Both directions take either block layout (sana_dit.stack_layers / unstack_layers): diffusers' state
dict is per block, so a stacked tree is unstacked on export and stacked after import.

The state-dict direction diffusers -> Flax is sana_dit.params_from_diffusers_state_dict (beside
the model, which tests and benchmarks call); this module holds its inverse and the config mapping.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict

from sanajax.models import sana_dit
from sanajax.models.weights_util import abstract_params, diffusers_version, write_diffusers_dir
from sanajax.safetensors_io import read_checked_state_dict, read_model_config

# diffusers config.json fields that sanajax does not model; values other than these are refused.
_FIXED = {"attention_bias": False, "norm_elementwise_affine": False, "dropout": 0.0}
# SanaDiT fields of the SANA-Sprint student (diffusers names), kept by model_config_from_module.
SPRINT_FIELDS = ("timestep_scale", "guidance_embeds", "guidance_embeds_scale")
# sanajax Sprint timestep_scale per unit of diffusers' (see sana_config_from_diffusers).
_SPRINT_TIME = 1e-3


def sana_config_from_diffusers(cfg: Mapping[str, Any], *, dtype: str = "float32",
                               scan_layers: bool = False) -> ml_collections.ConfigDict:
  """A sanajax `model` ConfigDict (fields of configs/sana_600m.py) from SanaTransformer2DModel's config.json;
  scan_layers picks the block layout (not a diffusers field)."""
  for field, value in _FIXED.items():
    if cfg.get(field, value) != value:
      raise NotImplementedError(f"SanaTransformer2DModel with {field}={cfg[field]!r} is not supported "
                                f"(every released SANA model has {field}={value!r}).")
  heads, head_dim = int(cfg.get("num_attention_heads", 70)), int(cfg.get("attention_head_dim", 32))
  hidden = heads * head_dim
  cross_dim = cfg.get("cross_attention_dim", 2240)
  if cross_dim is not None and int(cross_dim) != hidden:
    raise NotImplementedError(f"cross_attention_dim={cross_dim} differs from the hidden size {hidden}; sanajax's "
                              f"cross-attention reads the projected caption (hidden size) as diffusers' SANA does.")
  qk_norm = cfg.get("qk_norm")
  if qk_norm not in (None, "rms_norm_across_heads"):
    raise NotImplementedError(f"qk_norm={qk_norm!r} is not supported; only None or 'rms_norm_across_heads'.")
  interpolation = cfg.get("interpolation_scale")
  in_channels = int(cfg.get("in_channels", 32))
  m = ml_collections.ConfigDict()
  m.name = "sana_dit"
  m.depth = int(cfg.get("num_layers", 20))
  m.hidden_size = hidden
  m.linear_head_dim = head_dim
  m.cross_num_heads = int(cfg.get("num_cross_attention_heads", 20))
  m.cross_head_dim = int(cfg.get("cross_attention_head_dim", 112))
  m.mlp_ratio = float(cfg.get("mlp_ratio", 2.5))
  m.patch_size = int(cfg.get("patch_size", 1))
  m.caption_channels = int(cfg.get("caption_channels", 2304))
  m.in_channels = in_channels
  m.out_channels = int(cfg.get("out_channels") or in_channels)
  m.sample_size = int(cfg.get("sample_size", 32))
  # diffusers: a sin-cos PE exists iff interpolation_scale is set (PatchEmbed pos_embed_type).
  m.use_pe = interpolation is not None
  m.pe_interpolation = float(interpolation) if interpolation is not None else 1.0
  m.attn_eps = 1e-15  # SanaLinearAttnProcessor2_0's eps.
  m.norm_eps = float(cfg.get("norm_eps", 1e-6))
  m.y_norm_scale = 0.01  # Only the initial value of caption_norm/scale; loaded weights replace it.
  m.qk_norm = qk_norm is not None
  m.dtype = dtype
  m.attn_impl = "xla"
  m.remat = "none"
  m.scan_layers = bool(scan_layers)
  timestep_scale = float(cfg.get("timestep_scale", 1.0))
  if cfg.get("guidance_embeds", False):
    m.guidance_embeds = True
    m.guidance_embeds_scale = float(cfg.get("guidance_embeds_scale", 0.1))
    # SanaSprintPipeline feeds the transformer the sCM time s in [0, 1] as `timestep` (it never
    # applies timestep_scale, 1.0 in the released config); sanajax embeds 1000 * timestep_scale * t,
    # so Sprint models get 0.001 x diffusers' value and take t = s (configs/sprint_600m.py).
    m.timestep_scale = timestep_scale * _SPRINT_TIME
  elif timestep_scale != 1.0:
    m.timestep_scale = timestep_scale  # SanaPipeline feeds timestep * timestep_scale, as sanajax embeds.
  return m


def dit_diffusers_config(model_config: Mapping[str, Any]) -> dict:
  """SanaTransformer2DModel config.json contents for a sanajax `model` config (inverse of the above)."""
  kw = sana_dit.diffusers_kwargs(model_config)
  if kw.get("guidance_embeds"):  # The inverse of sana_config_from_diffusers' Sprint time convention.
    kw["timestep_scale"] = kw["timestep_scale"] / _SPRINT_TIME
  return {"_class_name": "SanaTransformer2DModel", "_diffusers_version": diffusers_version(), **kw}


def dit_state_dict_from_params(params: Mapping) -> dict[str, jax.Array]:
  """The exact inverse of sana_dit.params_from_diffusers_state_dict: Flax params -> diffusers state dict.

  transformer_blocks_3/attn1/to_out/kernel -> transformer_blocks.3.attn1.to_out.0.weight; kernels
  transposed back ((I, O) -> (O, I); conv (kh, kw, I, O) -> (O, I, kh, kw); the 1x1 convs that are
  Dense here -> (O, I, 1, 1)); scale -> weight. Works on arrays or ShapeDtypeStructs (via eval_shape),
  in either block layout (stacked blocks are unstacked first).
  """
  out = {}
  for path, value in flatten_dict(sana_dit.unstack_layers(nn.unbox(params))).items():
    parts = list(path)
    if parts[0].startswith("transformer_blocks_"):
      parts = ["transformer_blocks", parts[0][len("transformer_blocks_"):]] + parts[1:]
    if "to_out" in parts:
      i = parts.index("to_out")
      parts.insert(i + 1, "0")
    leaf = parts[-1]
    value = jnp.asarray(value)
    if leaf == "kernel":
      if value.ndim == 2 and parts[-2] in sana_dit.POINTWISE_CONVS:
        value = value.T[:, :, None, None]
      elif value.ndim == 2:
        value = value.T
      elif value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      parts[-1] = "weight"
    elif leaf == "scale":
      parts[-1] = "weight"
    out[".".join(parts)] = value
  return out


def dit_init_args(model_config: Mapping[str, Any]) -> tuple:
  """The smallest (x, t, context, mask) ShapeDtypeStructs that init a DiT of `model_config`: one patch,
  one token (the parameter shapes do not depend on the input's size)."""
  p = model_config["patch_size"]
  return sana_dit.dummy_inputs(model_config, (p, p), 1)


def load_sana_transformer(path: str, *, dtype: str = "float32", return_config: bool = False,
                          scan_layers: bool = False):
  """(model, params) of a diffusers SanaTransformer2DModel directory (config.json + weights).

  The returned model is a `SanaDiT` with float32 parameters and compute dtype `dtype`:
  model.apply({"params": params}, latents, t, context, context_mask) with latents (B, H, W, C)
  float32, t (B,) = diffusers' `timestep` / 1000, context (B, L, caption_channels) and
  context_mask (B, L) of 0/1 -> (B, H, W, out_channels), as diffusers' forward (NCHW there).
  SANA-Sprint directories (guidance_embeds: true) follow sanajax's Sprint convention instead:
  t is the time SanaSprintPipeline passes as `timestep` (the sCM time in [0, 1]; the model's
  timestep_scale is 0.001 x diffusers'), and the keyword `guidance=(B,)` is the raw CFG scale
  (e.g. 4.5; the model multiplies it by guidance_embeds_scale, as that pipeline does).
  With return_config, returns (model, params, model_config ConfigDict). scan_layers: the model runs
  its blocks with nn.scan and params are in the stacked layout (sana_dit.stack_layers).
  """
  cfg = read_model_config(path, "SanaTransformer2DModel")
  model_config = sana_config_from_diffusers(cfg, dtype=dtype, scan_layers=scan_layers)
  model = sana_dit.build_dit(model_config)
  want = jax.eval_shape(dit_state_dict_from_params, abstract_params(model, *dit_init_args(model_config)))
  state = read_checked_state_dict(path, want)
  params = sana_dit.to_layout(sana_dit.params_from_diffusers_state_dict(state), scan_layers)
  return (model, params, model_config) if return_config else (model, params)


def model_config_from_module(model: sana_dit.SanaDiT, sample_size: int | None = None) -> dict:
  """The `model` config fields of a SanaDiT instance (what build_dit would rebuild it from)."""
  fields = ("depth", "hidden_size", "linear_head_dim", "cross_num_heads", "cross_head_dim", "mlp_ratio",
            "patch_size", "caption_channels", "in_channels", "out_channels", "use_pe", "pe_interpolation",
            "attn_eps", "norm_eps", "y_norm_scale", "qk_norm") + SPRINT_FIELDS
  mc = {f: getattr(model, f) for f in fields}
  if sample_size is None:
    sample_size = model.pe_base_size * model.patch_size if model.pe_base_size else 32
  mc["sample_size"] = int(sample_size)
  return mc


def save_diffusers(directory: str, model: sana_dit.SanaDiT, params: Mapping, *, dtype: str = "float32",
                   sample_size: int | None = None) -> None:
  """Writes a SanaDiT as a diffusers directory (config.json + diffusion_pytorch_model.safetensors)
  that SanaTransformer2DModel.from_pretrained loads. dtype: float32 (bit-identical round trip),
  bfloat16 or float16. sample_size: diffusers' `sample_size` (latent side); default the model's PE
  base grid, else 32. params: either block layout.
  """
  config = dit_diffusers_config(model_config_from_module(model, sample_size))
  write_diffusers_dir(directory, config, dit_state_dict_from_params(params), dtype)
