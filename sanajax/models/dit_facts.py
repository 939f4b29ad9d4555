"""Facts of a SANA DiT config without allocating it: parameters per module, shapes, FLOPs.

Used by `python -m sanajax.info` and by the trainers (TFLOP/s in the metrics). Counts the DiT only
(not the text encoder or the autoencoder). Parameters come from `jax.eval_shape(model.init)`, so a
1600M model is described in seconds on a CPU.

FLOPs are counted analytically (2 per multiply-add) for one image; elementwise work (norms,
activations, modulation, softmax) is left out. With N image tokens (latent H*W / p^2), h hidden,
L = text.max_length text tokens, D = linear_head_dim, c = cross heads * cross head dim,
f = int(h * mlp_ratio), per block:
  linear self-attention  q, k, v, out projections 8 N h^2, plus the attention itself as SANA
                         computes it with V padded by a row of ones: (V|1) K^T and that times Q,
                         4 N h (D + 1)
  cross-attention        q 2 N h c, k and v 4 L h c, scores and weighted sum 4 N L c, out 2 N c h
  Mix-FFN                1x1 h -> 2f: 4 N h f, depthwise 3x3: 36 N f, 1x1 f -> h: 2 N f h
plus patch embedding 2 N p^2 C h, caption projection 2 L (caption h + h^2), timestep MLP
2 (256 h + h^2 + 6 h^2) and the output projection 2 N h p^2 C. A training step costs
3 x forward (the backward pass is twice the forward), times train.batch_size.
"""
from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np

from sanajax import resolution
from sanajax.models import backbones, mmdit


def forward_flops(model_config: Any, latent_hw: tuple[int, int], text_length: int) -> dict[str, int]:
  """Analytic forward FLOPs for one image, by part (see the module docstring)."""
  m = model_config
  h, p, cin = m.hidden_size, m.patch_size, m.in_channels
  n = (latent_hw[0] // p) * (latent_hw[1] // p)
  l = text_length
  d = m.linear_head_dim
  c = m.cross_num_heads * m.cross_head_dim
  f = int(h * m.mlp_ratio)
  self_attn = 8 * n * h * h + 4 * n * h * (d + 1)
  cross_attn = 2 * n * h * c + 4 * l * h * c + 4 * n * l * c + 2 * n * c * h
  mix_ffn = 4 * n * h * f + 36 * n * f + 2 * n * f * h
  return {
      "patch_embed": 2 * n * p * p * cin * h,
      "time_embed": 2 * (256 * h + h * h + 6 * h * h),
      "caption_projection": 2 * l * (m.caption_channels * h + h * h),
      "self_attention": m.depth * self_attn,
      "cross_attention": m.depth * cross_attn,
      "mix_ffn": m.depth * mix_ffn,
      "proj_out": 2 * n * h * p * p * cin,
  }


def mmdit_forward_flops(model_config: Any, latent_hw: tuple[int, int], text_length: int) -> dict[str, int]:
  """Analytic forward FLOPs of an MM-DiT (sanajax.models.mmdit) for one image, by part, counted as
  the linear DiT's (2 per multiply-add, elementwise work left out). N image tokens, L text tokens,
  T = N + L joint tokens, h hidden (heads x head dim), per block: q, k, v and out projections of
  both streams 8 T h^2 (the last block's text stream has no out projection or MLP: ignored),
  the joint attention 4 T^2 h (softmax: scores and weighted sum) or 4 T h (D + 1) (linear, D =
  head dim), the 4x MLPs 16 T h^2, the adaLN modulations 2 (6 + 6) h^2; a dual-attention block
  adds an image-only attention (8 N h^2 + 4 N^2 h, or its linear form) and 3 h^2 of modulation."""
  m = dict(model_config)
  p, cin = int(m["patch_size"]), int(m["in_channels"])
  heads, d = int(m["num_attention_heads"]), int(m["attention_head_dim"])
  h = heads * d
  n = (latent_hw[0] // p) * (latent_hw[1] // p)
  l = int(text_length)
  tokens = n + l
  linear = m.get("joint_attention", "softmax") == "linear"
  attend = (lambda k: 4 * k * h * (d + 1)) if linear else (lambda k: 4 * k * k * h)
  layers = int(m["num_layers"])
  dual = len(tuple(m.get("dual_attention_layers") or ()))
  pooled, ctx = int(m["pooled_projection_dim"]), int(m["joint_attention_dim"])
  return {
      "patch_embed": 2 * n * p * p * cin * h,
      "time_text_embed": 2 * (256 * h + h * h + pooled * h + h * h),
      "context_embedder": 2 * l * ctx * h,
      "joint_attention": layers * (8 * tokens * h * h + attend(tokens)),
      "image_attention": dual * (8 * n * h * h + attend(n)),
      "mlp": layers * 16 * tokens * h * h,
      "adaln": layers * 2 * 12 * h * h + dual * 2 * 3 * h * h,
      "proj_out": 2 * n * h * p * p * cin + 2 * 2 * h * h,
  }


def describe(config: Any) -> dict[str, Any]:
  """Facts of the config's DiT: params (total and per top-level module), shapes, FLOPs.

  Applies the resolution preset first (sanajax.resolution), as the CLI does after overrides.
  """
  config = resolution.apply_resolution(config)
  m = config.model
  res = int(config.data.resolution)
  down = resolution.ae_downsample(config)
  latent_hw = (res // down, res // down)
  text_length = int(config.text.max_length)
  is_mmdit = backbones.backbone_name(m) == "mmdit"
  model = backbones.build_backbone(m)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *backbones.dummy_inputs(m, latent_hw, text_length))["params"]
  per_module: dict[str, int] = collections.OrderedDict()
  for name, sub in shapes.items():
    key = "transformer_blocks" if name.startswith("transformer_blocks_") else name
    if is_mmdit and name == "pos_embed":  # the frozen sin-cos table is a buffer, not a parameter (diffusers)
      sub = {k: v for k, v in sub.items() if f"pos_embed/{k}" not in mmdit.FROZEN_PARAMS}
    count = sum(int(np.prod(getattr(x, "value", x).shape)) for x in
                jax.tree.leaves(sub, is_leaf=lambda x: hasattr(x, "names")))
    per_module[key] = per_module.get(key, 0) + count
  flops = (mmdit_forward_flops if is_mmdit else forward_flops)(m, latent_hw, text_length)
  fwd = sum(flops.values())
  batch = int(config.train.batch_size)
  p = m.patch_size
  return {
      "resolution": res,
      "latent_shape": (*latent_hw, int(m.in_channels)),
      "image_tokens": (latent_hw[0] // p) * (latent_hw[1] // p),
      "text_tokens": text_length,
      "depth": int(m.num_layers if is_mmdit else m.depth),
      "hidden_size": int(m.num_attention_heads * m.attention_head_dim if is_mmdit else m.hidden_size),
      "params_per_module": dict(per_module),
      "total_params": int(sum(per_module.values())),
      "forward_flops_per_image": flops,
      "forward_flops": fwd,
      "batch_size": batch,
      "train_step_flops": 3 * fwd * batch,
  }


def format_description(info: dict[str, Any]) -> str:
  """Human-readable lines; the last is exactly `total_params: N`."""
  lines = [f"Denoiser only (no text encoder, no autoencoder); resolution {info['resolution']} px",
           f"latent (H, W, C): {info['latent_shape']}  image tokens: {info['image_tokens']}  "
           f"text tokens: {info['text_tokens']}  depth: {info['depth']}  hidden: {info['hidden_size']}",
           "parameters per module:"]
  for name, count in info["params_per_module"].items():
    lines.append(f"  {name:<22s} {count:>15,d}")
  lines.append("forward GFLOPs per image:")
  for name, count in info["forward_flops_per_image"].items():
    lines.append(f"  {name:<22s} {count / 1e9:>15.3f}")
  lines.append(f"  {'total':<22s} {info['forward_flops'] / 1e9:>15.3f}")
  lines.append(f"train step TFLOPs (3 x forward x batch {info['batch_size']}): {info['train_step_flops'] / 1e12:.3f}")
  lines.append(f"total_params: {info['total_params']}")
  return "\n".join(lines)
