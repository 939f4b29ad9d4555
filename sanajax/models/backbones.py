"""The denoiser a config's `model.name` names, behind one call that every trainer and sampler uses.

    model = build_backbone(config.model)                      # "sana_dit" (default) or "mmdit"
    params = model.init(key, x, t, context, context_mask)["params"]
    v = model.apply({"params": params}, x, t, context, context_mask)   # (B, H, W, C) flow velocity

x (B, H, W, C) latents, t (B,) flow time in [0, 1], context (B, L, context_channels(model_config))
text-encoder states, context_mask (B, L) of 0/1. SANA's linear DiT (sanajax.models.sana_dit) takes
exactly this. SD3's MM-DiT (sanajax.models.mmdit) also needs a pooled text vector: a single-encoder
run (the tiny MM-DiT on shapes with the Gemma-2-architecture encoder) uses the masked mean of the
encoder states (model.pooled_text = "masked_mean", SD3 issue 28), so `MMDiTBackbone` computes it
and the trainers stay model-agnostic; a caller with real pooled embeddings (SD3's CLIP pair) passes
`pooled=` instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sanajax.dtypes import dtype_from_name
from sanajax.models import mmdit, sana_dit

BACKBONES = ("sana_dit", "mmdit")
# masked_mean: the mean of the encoder states (one encoder, pooled width = joint_attention_dim); clip: SD3's
# pooled CLIP-L + bigG projections (sd3_text.SD3TextEncoder), passed as `pooled=` (released width 2048).
POOLED_TEXT = ("masked_mean", "clip")


def backbone_name(model_config: Mapping[str, Any]) -> str:
  name = dict(model_config).get("name", "sana_dit")
  if name not in BACKBONES:
    raise ValueError(f"model.name={name!r}: use one of {BACKBONES}.")
  return name


def context_channels(model_config: Mapping[str, Any]) -> int:
  """Width of the text-encoder states the model reads (SANA: caption_channels; MM-DiT: joint_attention_dim)."""
  c = dict(model_config)
  return int(c["joint_attention_dim"] if backbone_name(c) == "mmdit" else c["caption_channels"])


def num_blocks(model_config: Mapping[str, Any]) -> int:
  """The denoiser's block count (SANA: depth; MM-DiT: num_layers), e.g. the bound of Sprint's head_block_ids."""
  c = dict(model_config)
  return int(c["num_layers"] if backbone_name(c) == "mmdit" else c["depth"])


def hidden_size(model_config: Mapping[str, Any]) -> int:
  """Width of the image tokens and of the conditioning vector (MM-DiT: num_attention_heads x attention_head_dim)."""
  c = dict(model_config)
  if backbone_name(c) == "mmdit":
    return int(c["num_attention_heads"]) * int(c["attention_head_dim"])
  return int(c["hidden_size"])


def masked_mean(context: jax.Array, mask: jax.Array | None) -> jax.Array:
  """(B, L, D) states, (B, L) 0/1 mask -> (B, D) float32 mean over the unmasked tokens."""
  context = context.astype(jnp.float32)
  if mask is None:
    return context.mean(axis=1)
  w = mask.astype(jnp.float32)[..., None]
  return (context * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


@dataclasses.dataclass(frozen=True)
class MMDiTBackbone:
  """An MMDiT called as the linear DiT is: (x, t, context, context_mask) with pooled = the masked
  mean of `context` (model.pooled_text), or `pooled=` given. init / apply take and return the
  MMDiT's own parameter tree, so converted SD3 weights load unchanged."""
  model: mmdit.MMDiT
  pooled_text: str = "masked_mean"  # model.pooled_text (POOLED_TEXT)

  @property
  def guidance_embeds(self) -> bool:
    """A Sprint student (the CFG embedding; apply takes guidance=), as SanaDiT.guidance_embeds."""
    return self.model.guidance_embeds

  def _pooled(self, context, context_mask, pooled, init=False):
    if pooled is not None:
      return pooled
    if self.pooled_text == "masked_mean":
      return masked_mean(context, context_mask)
    if init:  # parameter shapes only: zeros of the pooled width
      return jnp.zeros((context.shape[0], self.model.pooled_projection_dim), jnp.float32)
    raise ValueError("model.pooled_text='clip': pass pooled= (SD3's CLIP-L + bigG pooled embeddings, "
                     "sanajax.models.sd3_text).")

  def init(self, rngs, x, t, context, context_mask=None, *, pooled=None, **kwargs):
    return self.model.init(rngs, x, t, context, self._pooled(context, context_mask, pooled, init=True), context_mask,
                           **kwargs)

  def apply(self, variables, x, t, context, context_mask=None, *, pooled=None, **kwargs):
    return self.model.apply(variables, x, t, context, self._pooled(context, context_mask, pooled), context_mask,
                            **kwargs)


def build_backbone(model_config: Mapping[str, Any], dtype: Any = None, **overrides):
  """SanaDiT (model.name "sana_dit", the default) or MMDiTBackbone ("mmdit") from a `model` section.
  dtype (a name or jnp dtype) overrides model.dtype; `overrides` replace fields (e.g. features_at)."""
  c = dict(model_config)
  if backbone_name(c) == "sana_dit":
    if dtype is not None:
      overrides["dtype"] = dtype_from_name(dtype, "model.dtype") if isinstance(dtype, str) else dtype
    return sana_dit.build_dit(c, **overrides)
  pooled_text = c.get("pooled_text", "masked_mean")
  if pooled_text not in POOLED_TEXT:
    raise ValueError(f"model.pooled_text={pooled_text!r}: use one of {POOLED_TEXT}.")
  if pooled_text == "masked_mean" and int(c["pooled_projection_dim"]) != int(c["joint_attention_dim"]):
    raise ValueError(f"model.pooled_projection_dim={c['pooled_projection_dim']} must equal model.joint_attention_dim="
                     f"{c['joint_attention_dim']}: the pooled text is the masked mean of the encoder states.")
  name = None if dtype is None else (dtype if isinstance(dtype, str) else jnp.dtype(dtype).name)
  return MMDiTBackbone(mmdit.build_mmdit(c, dtype=name, **overrides), pooled_text=pooled_text)


def dummy_inputs(model_config: Mapping[str, Any], latent_hw: tuple[int, int], text_length: int, batch: int = 1):
  """ShapeDtypeStructs (x, t, context, context_mask) of build_backbone's call, for jax.eval_shape / init."""
  c = dict(model_config)
  return (jax.ShapeDtypeStruct((batch, *latent_hw, int(c["in_channels"])), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length, context_channels(c)), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length), jnp.int32))


def init_args(model_config: Mapping[str, Any]) -> tuple:
  """The smallest (x, t, context, context_mask) that init the backbone: one patch, one text token
  (parameter shapes do not depend on the input's size)."""
  p = int(dict(model_config)["patch_size"])
  return dummy_inputs(model_config, (p, p), 1)


def apply_conditioned(model, variables, x, t, context, context_mask=None, **kwargs):
  """model.apply with the text conditioning as the text encoder's `embed` gives it: the states (B, L, D),
  or SD3's {"context": (B, L, D), "pooled": (B, P)} (sd3_text.SD3PromptEncoder), whose pooled CLIP
  vector goes to the MM-DiT as `pooled=`. The one place the Generator and the DiT trainer call the model."""
  if isinstance(context, Mapping):
    return model.apply(variables, x, t, context["context"], context_mask, pooled=context["pooled"], **kwargs)
  return model.apply(variables, x, t, context, context_mask, **kwargs)
