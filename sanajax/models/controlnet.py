"""SANA's ControlNet-Transformer (Flax Linen, NHWC), equal in math to diffusers `SanaControlNetModel`.

    controlnet = build_controlnet(config.model, num_layers=7)
    residuals = controlnet.apply({"params": cn}, x, t, context, mask, control, conditioning_scale=1.0)
    v = dit.apply({"params": base}, x, t, context, mask, controlnet_residuals=residuals)
    # or both at once (CFG-doubled batches included):
    v = controlled_apply(dit, base, controlnet, cn, x, t, context, mask, control, scale)

A trainable copy of the first N DiT blocks (SANA's ControlNet-Transformer, NVlabs/Sana
asset/docs/sana_controlnet.md; N = copy_blocks_num, 7 in its configs). Its input is the noisy latents' patch embedding plus a
zero-initialised Linear (`input_block`) of the *same* patch embedding applied to the condition
latents (the control image encoded by the DC-AE, times its scaling factor); each copied block's
output goes through its own zero-initialised Linear (`controlnet_blocks_{k}`), is multiplied by
`conditioning_scale` and added to the frozen base after its block k + 1 (SanaDiT's
`controlnet_residuals`). With both Linears at zero a fresh ControlNet leaves the base unchanged.

Inputs as SanaDiT: x (B, H, W, C) latents, t (B,) flow time in [0, 1] (embedded as 1000 t, as
SanaControlNetPipeline passes the scheduler's timestep to both models), context (B, L,
caption_channels), context_mask (B, L) 0/1, control (B, H, W, C) condition latents. Output: N arrays
(B, H/p * W/p, h).

Parameter tree (diffusers state-dict keys, '.' -> '/'; sanajax.models.controlnet_diffusers maps them):
  patch_embed/proj, time_embed/{emb/timestep_embedder/linear_{1,2}, linear}, caption_projection/
  linear_{1,2}, caption_norm/scale, transformer_blocks_{i}/...   as SanaDiT's (copied from the base)
  input_block/{kernel, bias}, controlnet_blocks_{k}/{kernel, bias}   zero-initialised (h, h) Linears
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from sanajax.dtypes import dtype_from_name
from sanajax.models.layers import AdaLNSingle, CaptionProjection, PatchEmbed, RMSNorm, dense, logical_constraint, zeros
from sanajax.models.sana_dit import ACT_AXES, SanaBlock, SanaDiT, build_dit, is_stacked, to_layout

Dtype = Any
# The base DiT's parameters a fresh ControlNet starts from (NVlabs Sana copies the base into the
# ControlNet's blocks and embedders; its zero Linears start at zero).
SHARED_PREFIXES = ("patch_embed/", "time_embed/", "caption_projection/", "caption_norm/")


class SanaControlNet(nn.Module):
  """diffusers SanaControlNetModel; see the module docstring. Fields as SanaDiT's (depth = num_layers)."""
  depth: int
  hidden_size: int
  linear_head_dim: int
  cross_num_heads: int
  cross_head_dim: int
  mlp_ratio: float = 2.5
  patch_size: int = 1
  caption_channels: int = 2304
  in_channels: int = 32
  use_pe: bool = False
  pe_interpolation: float = 1.0
  pe_base_size: int | None = None
  attn_eps: float = 1e-15
  norm_eps: float = 1e-6
  y_norm_scale: float = 0.01
  timestep_scale: float = 1.0
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array | None,
               control: jax.Array, *, conditioning_scale: Any = 1.0) -> list[jax.Array]:
    """N residuals (B, H/p * W/p, h) in `dtype`, already times conditioning_scale (a scalar)."""
    h, p = self.hidden_size, self.patch_size
    gh, gw = x.shape[1] // p, x.shape[2] // p
    if control.shape != x.shape:
      raise ValueError(f"control latents {control.shape} must have the shape of the latents {x.shape}.")
    if context_mask is None:
      context_mask = jnp.ones(context.shape[:2], jnp.int32)
    patch = PatchEmbed(h, p, use_pe=self.use_pe, pe_interpolation=self.pe_interpolation,
                       pe_base_size=self.pe_base_size, dtype=self.dtype, name="patch_embed")
    cond = dense(h, ("embed", "embed"), dtype=self.dtype, kernel_init=zeros, name="input_block")(patch(control))
    tokens = logical_constraint(patch(x) + cond, ACT_AXES)
    t6, _ = AdaLNSingle(h, dtype=self.dtype, name="time_embed")(t.astype(jnp.float32)
                                                                  * (1000.0 * self.timestep_scale))
    ctx = CaptionProjection(h, dtype=self.dtype, name="caption_projection")(context)
    ctx = RMSNorm(1e-5, scale_init=self.y_norm_scale, dtype=self.dtype, name="caption_norm")(ctx)
    ctx = logical_constraint(ctx, ("batch", "text_length", "embed"))
    out = []
    for i in range(self.depth):
      tokens = SanaBlock(h, self.linear_head_dim, self.cross_num_heads, self.cross_head_dim, self.mlp_ratio,
                         self.attn_eps, self.norm_eps, False, self.attn_impl, self.dtype,
                         name=f"transformer_blocks_{i}")(tokens, ctx, context_mask, t6, gh, gw)
      res = dense(h, ("embed", "embed"), dtype=self.dtype, kernel_init=zeros, name=f"controlnet_blocks_{i}")(tokens)
      out.append(logical_constraint(res * jnp.asarray(conditioning_scale, self.dtype), ACT_AXES))
    return out


def build_controlnet(model_config: Mapping[str, Any], num_layers: int, *, check_depth: bool = True,
                     **overrides) -> SanaControlNet:
  """A SanaControlNet for the base DiT a `model` config describes, copying its first `num_layers` blocks.

  The base must be a plain SANA DiT layout (adaLN-single time embedding, no q/k norm), as diffusers'
  SanaControlNetModel; a Sprint student (guidance_embeds / qk_norm) is sampled with a ControlNet
  trained on its teacher instead (docs/controlnet.md). timestep_scale follows the base (1.0: 1000 t).
  check_depth: refuse num_layers >= model.depth (off for a loaded ControlNet, whose base is not known)."""
  c = dict(model_config)
  if c.get("guidance_embeds") or c.get("qk_norm"):
    raise ValueError("A SANA ControlNet copies a plain DiT (no guidance_embeds, no qk_norm, as diffusers' "
                     "SanaControlNetModel): train it on the teacher, then sample the Sprint student with it.")
  base = build_dit(c)
  if num_layers < 1 or (check_depth and num_layers >= base.depth):
    raise ValueError(f"controlnet.num_layers={num_layers} must be in [1, model.depth - 1 = {base.depth - 1}]: "
                     f"residual k is added after base block k + 1.")
  kwargs = {f: getattr(base, f) for f in (
      "hidden_size", "linear_head_dim", "cross_num_heads", "cross_head_dim", "mlp_ratio", "patch_size",
      "caption_channels", "in_channels", "use_pe", "pe_interpolation", "pe_base_size", "attn_eps", "norm_eps",
      "y_norm_scale", "timestep_scale", "dtype", "attn_impl")}
  kwargs.update(depth=int(num_layers))
  if "dtype" in overrides and isinstance(overrides["dtype"], str):
    overrides["dtype"] = dtype_from_name(overrides["dtype"], "model.dtype")
  kwargs.update(overrides)
  return SanaControlNet(**kwargs)


def controlnet_params_from_base(base_params: Mapping[str, Any], controlnet_params: Mapping[str, Any]) -> dict:
  """A fresh ControlNet's parameters: the base DiT's embedders and first N blocks copied over
  `controlnet_params` (its own init), whose zero Linears (input_block, controlnet_blocks_*) stay.

  Works on boxed (nn.Partitioned) or plain trees, and on a base in the scan_layers layout (its stacked
  blocks are unrolled first); a missing or differently shaped base weight raises."""
  base = nn.unbox(base_params)
  if is_stacked(base):
    base = to_layout(base, False)
  base = flatten_dict(base, sep="/")
  flat = flatten_dict(controlnet_params, sep="/", is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
  out = {}
  for name, value in flat.items():
    copied = name.startswith(SHARED_PREFIXES) or name.startswith("transformer_blocks_")
    if not copied:
      out[name] = value
      continue
    if name not in base:
      raise ValueError(f"ControlNet parameter {name} has no counterpart in the base DiT (a Sprint student or "
                       f"an MM-DiT cannot be copied; use its teacher).")
    src = base[name]
    leaf = value.value if isinstance(value, nn.Partitioned) else value
    if tuple(src.shape) != tuple(leaf.shape):
      raise ValueError(f"Base parameter {name} has shape {tuple(src.shape)}, the ControlNet's {tuple(leaf.shape)}.")
    src = jnp.asarray(src, leaf.dtype)
    out[name] = value.replace_boxed(src) if isinstance(value, nn.Partitioned) else src
  return unflatten_dict(out, sep="/")


def match_batch(control: jax.Array, batch: int) -> jax.Array:
  """Condition latents (b, H, W, C) repeated to `batch` rows: b = 1 broadcasts, and a CFG-doubled
  batch [cond; uncond] (samplers.guided_velocity) gets [control; control]."""
  if control.shape[0] == batch:
    return control
  if batch % control.shape[0]:
    raise ValueError(f"control batch {control.shape[0]} does not divide the model batch {batch}.")
  return jnp.tile(control, (batch // control.shape[0], 1, 1, 1))


def controlled_apply(dit: SanaDiT, dit_params: Any, controlnet: SanaControlNet, controlnet_params: Any,
                     x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array | None,
                     control: jax.Array, conditioning_scale: Any = 1.0, **kwargs) -> jax.Array:
  """The base DiT's velocity (B, H, W, C) steered by the ControlNet (SanaControlNetPipeline's two calls).

  control: (b, H, W, C) condition latents, b = B, 1 or B / 2 (see match_batch). kwargs go to the base
  (e.g. guidance= of a Sprint student; the ControlNet, trained on its teacher, takes none)."""
  control = match_batch(control, x.shape[0])
  residuals = controlnet.apply({"params": controlnet_params}, x, t, context, context_mask, control,
                               conditioning_scale=conditioning_scale)
  return dit.apply({"params": dit_params}, x, t, context, context_mask, controlnet_residuals=residuals, **kwargs)


@dataclasses.dataclass(frozen=True)
class ControlledDiT:
  """A base DiT steered by a ControlNet, called as every backbone is (backbones.apply_conditioned):

    v = ControlledDiT(dit, controlnet).apply(
        {"params": {"base": dit_params, "controlnet": cn_params, "control": latents, "scale": s}}, x, t, ctx, mask)

  so the DiT trainer's loss (training.dit.make_loss_fn, with the ControlNet's parameters as the
  trainable part) and the Generator's samplers run it unchanged. "scale" is optional (1.0)."""
  dit: SanaDiT
  controlnet: SanaControlNet

  @property
  def guidance_embeds(self) -> bool:  # a Sprint student keeps its embedded guidance (Generator.sample_latents)
    return self.dit.guidance_embeds

  def apply(self, variables, x, t, context, context_mask=None, **kwargs):
    p = variables["params"]
    return controlled_apply(self.dit, p["base"], self.controlnet, p["controlnet"], x, t, context, context_mask,
                            p["control"], p.get("scale", 1.0), **kwargs)


def init_args(model_config: Mapping[str, Any]) -> tuple:
  """The smallest (x, t, context, context_mask, control) ShapeDtypeStructs that init a SanaControlNet."""
  c = dict(model_config)
  p = int(c["patch_size"])
  x = jax.ShapeDtypeStruct((1, p, p, int(c["in_channels"])), jnp.float32)
  return (x, jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1, 1, int(c["caption_channels"])), jnp.float32),
          jax.ShapeDtypeStruct((1, 1), jnp.int32), x)


def init_controlnet(model: SanaControlNet, model_config: Mapping[str, Any], key: jax.Array) -> dict:
  """A ControlNet's own initial parameters (boxed with logical axes; shapes need not match any input)."""
  args = [jnp.zeros(a.shape, a.dtype) for a in init_args(model_config)]
  return model.init(key, *args)["params"]


def encode_control(ae_model: nn.Module, ae_params: Any, images: jax.Array, ae_scaling: float,
                   ae_shift: float = 0.0) -> jax.Array:
  """Control images (B, R, R, 3) in [-1, 1] -> condition latents (B, R/f, R/f, C): the AE's encoding
  times its scaling factor, as SanaControlNetPipeline (`vae.encode(image).latent * scaling_factor`) and
  as the DiT's own latents ((raw - ae_shift) * ae_scaling; the DC-AE's shift is 0)."""
  raw = ae_model.apply({"params": ae_params}, images, method=ae_model.encode)
  return (raw - ae_shift) * ae_scaling
