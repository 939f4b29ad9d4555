"""MM-DiT (SD3 / SD3.5), Flax Linen, NHWC; equal in math to diffusers `SD3Transformer2DModel`.

    model = build_mmdit(config.model)
    params = model.init(key, *dummy_inputs(config.model, (64, 64), 333))["params"]
    v = model.apply({"params": params}, latents, t, context, pooled, context_mask)   # (B, H, W, out_channels)

Inputs: latents (B, H, W, in_channels); t (B,) = diffusers' `timestep` / 1000 (the flow time in
[0, 1]; 1000 t is embedded, as StableDiffusion3Pipeline feeds `timestep` = 1000 sigma); context
(B, L, joint_attention_dim) text-encoder states; pooled (B, pooled_projection_dim) pooled text;
context_mask (B, L) of 0/1 or None. diffusers has no text mask: context_mask=None (every key
attended) is exactly SD3Transformer2DModel; a mask drops the padded text tokens as keys of every
joint attention, so a padded batch computes what the unpadded shorter context computes for the
image tokens (the padded text tokens' own outputs are left as they come, never read back).

The model (SD3 paper, arXiv:2403.03206, Fig. 2; diffusers JointTransformerBlock):
  image tokens  x = PatchEmbed(latents) + 2D sin-cos PE centre-cropped from a pos_embed_max_size^2 grid
  text tokens   c = context_embedder(context)                    (joint_attention_dim -> hidden)
  conditioning  temb = timestep MLP(sinusoid(1000 t)) + text_embedder(pooled)   (hidden)
  each block    adaLN-Zero: (shift, scale, gate) x 2 = Linear(SiLU(temb)) per stream, LN eps 1e-6 non-affine;
                joint attention over [x; c] with separate q/k/v/out weights per stream (to_* for x,
                add_*_proj / to_add_out for c), optional per-head RMSNorm on q and k (qk_norm="rms_norm",
                eps 1e-6); a GELU(tanh) MLP 4x per stream; the last block's text stream is pre-only
                (context_pre_only: adaLN-continuous (scale, shift) only, no output projection, no MLP);
                SD3.5 dual-attention blocks (dual_attention_layers) add an image-only self-attention
                `attn2` with its own (shift, scale, gate) (SD35AdaLayerNormZeroX: 9 chunks).
  out           adaLN-continuous (scale, shift) from temb, proj_out, unpatchify.

joint_attention="linear" replaces every softmax attention (the joint one and attn2) by SANA's ReLU
linear attention (sanajax.kernels.linear_attention, O(N) in tokens; no 1/sqrt(d), eps 1e-15; masked
text keys are zeroed, so they add nothing to K^T V nor to the normaliser). The parameter tree is the
same, so the two share weights and checkpoints. Softmax attention goes through
`jax.nn.dot_product_attention`, float32 logits and softmax: its XLA implementation unless
attn_impl="cudnn" (cuDNN flash attention: GPU, bfloat16 / float16 compute; jax 0.10's default never
picks it by itself; not yet run on a GPU here). For the linear kind attn_impl is the kernel's `impl`.

Parameter tree (diffusers state-dict keys, '.' -> '/', transformer_blocks.i -> transformer_blocks_i,
to_out.0 -> to_out, ff.net.0.proj -> ff/net_0/proj, ff.net.2 -> ff/net_2; Linear weight -> kernel
(transposed), norm weight -> scale):
  pos_embed/proj (conv p x p), pos_embed/pos_embed (1, M*M, hidden) when pos_embed_max_size = M
  time_text_embed/{timestep_embedder, text_embedder}/linear_{1,2}, context_embedder
  transformer_blocks_{i}/{norm1, norm1_context}/linear, attn/{to_q, to_k, to_v, add_q_proj, add_k_proj,
    add_v_proj, to_out, to_add_out, norm_q, norm_k, norm_added_q, norm_added_k}, attn2/{to_q, to_k, to_v,
    to_out, norm_q, norm_k}, ff/{net_0/proj, net_2}, ff_context/...
  norm_out/linear, proj_out
`pos_embed/pos_embed` is diffusers' persistent buffer: kept in the tree so released checkpoints
load exactly (their table is the one the model was trained with), but read through stop_gradient
(it gets zero gradients; exclude it from weight decay, see FROZEN_PARAMS) and not counted as a
parameter (`param_count`, as diffusers' `parameters()`). Logical axis names as sanajax.models.layers
("embed" hidden, "heads" fused heads*head_dim, "mlp" the 4x MLP, "adaln" modulations, "caption" the
text / pooled widths, "channels", "time_freq"); image-token activations are constrained to
("batch", "length", "embed"), text tokens to ("batch", "text_length", "embed").
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax.dtypes import dtype_from_name
from sanajax.kernels import linear_attention
from sanajax.models.layers import (
  RMSNorm,
  TimestepEmbedder,
  dense,
  flat_xavier_uniform,
  layer_norm_no_affine,
  logical_constraint,
  remat_policy,
  timestep_sinusoid,
  unpatchify,
  zeros,
)

Dtype = Any
ACT_AXES = ("batch", "length", "embed")
TEXT_AXES = ("batch", "text_length", "embed")
JOINT_ATTENTION_KINDS = ("softmax", "linear")
QK_NORMS = (None, "rms_norm")
# Leaves that are diffusers buffers, not trained (zero gradient; keep them out of weight decay).
FROZEN_PARAMS = ("pos_embed/pos_embed",)
LINEAR_ATTN_EPS = 1e-15  # SANA's (SanaLinearAttnProcessor2_0).
NORM_EPS = 1e-6  # Every LayerNorm and the q/k RMSNorms of SD3.


def sincos_1d(embed_dim: int, pos: jax.Array | np.ndarray, xp=jnp):
  """diffusers get_1d_sincos_pos_embed_from_grid: positions (M,) -> (M, embed_dim) = [sin, cos]
  with frequencies 1 / 10000^(i / (embed_dim/2)). xp=np: float64 (as diffusers), jnp: float32."""
  dtype = np.float64 if xp is np else jnp.float32
  omega = 1.0 / 10000 ** (xp.arange(embed_dim // 2, dtype=dtype) / (embed_dim / 2.0))
  out = pos.reshape(-1).astype(dtype)[:, None] * omega[None]
  return xp.concatenate([xp.sin(out), xp.cos(out)], axis=1)


def sd3_pos_positions(n: int, base_size: int, xp=jnp):
  """Grid positions arange(n) / (n / base_size) in float32 (diffusers get_2d_sincos_pos_embed)."""
  return xp.arange(n, dtype=np.float32) / np.float32(n / base_size)


def sd3_pos_embed(embed_dim: int, rows: Sequence[int] | range, cols: Sequence[int] | range, grid_h: int,
                  grid_w: int, base_size: int, xp=jnp):
  """Rows x cols of the 2D sin-cos table of a grid_h x grid_w grid -> (len(rows) * len(cols), embed_dim).

  diffusers get_2d_sincos_pos_embed: the first embed_dim/2 channels embed the column (w) position,
  the rest the row (h) position; tokens row-major. Computing only the rows / cols needed (the crop)
  gives the same entries as cropping the full table.
  """
  if embed_dim % 4:
    raise ValueError(f"The sin-cos position embedding needs a hidden size divisible by 4, got {embed_dim}.")
  ph = sd3_pos_positions(grid_h, base_size, xp)[np.asarray(rows)]
  pw = sd3_pos_positions(grid_w, base_size, xp)[np.asarray(cols)]
  eh, ew = sincos_1d(embed_dim // 2, ph, xp), sincos_1d(embed_dim // 2, pw, xp)  # (h, D/2), (w, D/2)
  nh, nw = eh.shape[0], ew.shape[0]
  emb = xp.concatenate([xp.broadcast_to(ew[None], (nh, nw, embed_dim // 2)),
                        xp.broadcast_to(eh[:, None], (nh, nw, embed_dim // 2))], axis=-1)
  return emb.reshape(nh * nw, embed_dim).astype(np.float32)


def crop_box(grid_h: int, grid_w: int, max_size: int) -> tuple[int, int]:
  """(top, left) of the centred grid_h x grid_w crop of a max_size^2 PE table (diffusers cropped_pos_embed)."""
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"A {grid_h}x{grid_w} patch grid does not fit model.pos_embed_max_size={max_size}; use latents "
                     f"of at most {max_size} patches a side or a model with a larger pos_embed_max_size.")
  return (max_size - grid_h) // 2, (max_size - grid_w) // 2


class SD3PatchEmbed(nn.Module):
  """diffusers PatchEmbed with SD3 cropping: (B, H, W, C) -> (B, H/p * W/p, hidden) + PE.

  pos_embed_max_size M: a (1, M*M, hidden) table (the `pos_embed` leaf, initialised to the sin-cos
  table with base_size = sample_size / p) centre-cropped to the patch grid; None: the sin-cos table
  of the patch grid itself with the same base size (diffusers' non-persistent buffer).
  """
  hidden_size: int
  patch_size: int
  sample_size: int
  pos_embed_max_size: int | None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    b, hh, ww, _ = x.shape
    if hh % p or ww % p:
      raise ValueError(f"Latents {hh}x{ww} are not divisible by the patch size {p}.")
    gh, gw = hh // p, ww // p
    h = self.hidden_size
    base = self.sample_size // p
    y = nn.Conv(h, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(flat_xavier_uniform, (None, None, "channels", "embed")),
                bias_init=nn.with_logical_partitioning(zeros, ("embed",)), name="proj")(x.astype(self.dtype))
    y = y.reshape(b, gh * gw, h)
    m = self.pos_embed_max_size
    if m:
      top, left = crop_box(gh, gw, m)
      init = lambda key, shape, dtype=jnp.float32: sd3_pos_embed(h, range(m), range(m), m, m, base)[None]
      table = self.param("pos_embed", nn.with_logical_partitioning(init, (None, None, "embed")), (1, m * m, h),
                         jnp.float32)
      # A buffer in diffusers: never trained.
      table = jax.lax.stop_gradient(table).reshape(m, m, h)
      pe = table[top:top + gh, left:left + gw].reshape(gh * gw, h)
    else:
      pe = jnp.asarray(sd3_pos_embed(h, range(gh), range(gw), gh, gw, base, xp=np))
    return (y.astype(jnp.float32) + pe[None]).astype(self.dtype)


class PooledTextEmbedder(nn.Module):
  """diffusers PixArtAlphaTextProjection(act_fn="silu"): (B, pooled) -> Linear -> SiLU -> Linear -> (B, hidden)."""
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    y = dense(self.hidden_size, ("caption", "embed"), dtype=self.dtype, name="linear_1")(y.astype(self.dtype))
    return dense(self.hidden_size, ("embed", "embed"), dtype=self.dtype, name="linear_2")(nn.silu(y))


class TimeTextEmbed(nn.Module):
  """diffusers CombinedTimestepTextProjEmbeddings: timestep (B,) in 0..1000, pooled (B, P) -> temb (B, hidden).

  guidance (B,) (a Sprint student's CFG scale, already times guidance_embeds_scale) adds a
  `guidance_embedder` (the name of diffusers' CombinedTimestepGuidanceTextProjEmbeddings): the timestep
  MLP with its last layer zero-initialised, as SANA-Sprint's cfg_embedder, so a student initialised
  from its teacher computes the teacher's function until it is trained.
  """
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    t = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="timestep_embedder")(timestep_sinusoid(timestep))
    if guidance is not None:
      t = t + TimestepEmbedder(self.hidden_size, dtype=self.dtype, last_kernel_init=nn.initializers.zeros,
                               name="guidance_embedder")(timestep_sinusoid(guidance))
    return t + PooledTextEmbedder(self.hidden_size, dtype=self.dtype, name="text_embedder")(pooled)


class AdaModulation(nn.Module):
  """The Linear(SiLU(temb)) of diffusers' AdaLayerNormZero / ...ZeroX / ...Continuous: (B, hidden) ->
  `chunks` tensors (B, 1, hidden), in diffusers' chunk order. Zero-initialised (adaLN-Zero: every
  gate, shift and scale starts at 0, so a fresh block is the identity)."""
  hidden_size: int
  chunks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    mods = dense(self.chunks * self.hidden_size, ("embed", "adaln"), dtype=self.dtype, kernel_init=zeros,
                 name="linear")(nn.silu(temb))
    return [m[:, None] for m in jnp.split(mods, self.chunks, axis=-1)]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, kind: str, impl: str) -> jax.Array:
  """Attention over (B, S, heads, head_dim) q / k / v -> (B, S, heads, head_dim) in v's dtype.

  key_mask (B, S) of 0/1 or None. softmax: jax.nn.dot_product_attention (1/sqrt(head_dim), float32
  softmax; masked keys get no weight); linear: ReLU linear attention with masked keys zeroed.
  """
  if kind == "linear":
    if key_mask is not None:
      keep = key_mask.astype(k.dtype)[:, :, None, None]
      k, v = k * keep, v * keep  # relu(0) = 0: a masked key adds nothing to K^T V or to the normaliser.
    return linear_attention(q, k, v, eps=LINEAR_ATTN_EPS, impl="xla" if impl == "cudnn" else impl).astype(v.dtype)
  mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)


class JointAttention(nn.Module):
  """diffusers Attention + JointAttnProcessor2_0 (added_kv_proj_dim=hidden, bias=True): image tokens x
  (B, N, hidden) and text tokens c (B, L, hidden) attend jointly over [x; c]. Returns (x_out, c_out);
  c_out is None when context_pre_only (no to_add_out). Without `c` (attn2 of a dual block): plain
  self-attention over x, returning x_out."""
  hidden_size: int
  num_heads: int
  head_dim: int
  context_pre_only: bool | None = False  # None: no text stream (attn2).
  qk_norm: str | None = None
  kind: str = "softmax"
  impl: str = "xla"
  dtype: Dtype = jnp.float32

  def _qkv(self, y: jax.Array, names: tuple[str, str, str], norms: tuple[str, str]):
    b, n, _ = y.shape
    inner = self.num_heads * self.head_dim
    q, k, v = (dense(inner, ("embed", "heads"), dtype=self.dtype, name=name)(y).reshape(b, n, self.num_heads,
                                                                                        self.head_dim)
               for name in names)
    if self.qk_norm == "rms_norm":  # Per head (over head_dim), learnable scale: diffusers RMSNorm(dim_head, 1e-6).
      q = RMSNorm(NORM_EPS, axis_name=None, dtype=self.dtype, name=norms[0])(q)
      k = RMSNorm(NORM_EPS, axis_name=None, dtype=self.dtype, name=norms[1])(k)
    return q, k, v

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | None = None, key_mask: jax.Array | None = None):
    b, n, _ = x.shape
    inner = self.num_heads * self.head_dim
    q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    if c is not None:
      cq, ck, cv = self._qkv(c, ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
      if key_mask is not None:
        key_mask = jnp.concatenate([jnp.ones((b, n), key_mask.dtype), key_mask], axis=1)
    out = attend(q, k, v, key_mask, self.kind, self.impl).reshape(b, -1, inner).astype(self.dtype)
    x_out = dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, name="to_out")(out[:, :n])
    if c is None:
      return x_out
    c_out = None
    if not self.context_pre_only:
      c_out = dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, name="to_add_out")(out[:, n:])
    return x_out, c_out


class GELUProj(nn.Module):
  """diffusers GELU(approximate="tanh"): Linear `proj` then GELU(tanh); (B, S, h) -> (B, S, features)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.gelu(dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
  """diffusers FeedForward(dim, activation_fn="gelu-approximate"): Linear(h, 4h) -> GELU(tanh) -> Linear(4h, h)."""
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = GELUProj(4 * self.hidden_size, self.dtype, name="net_0")(x)  # net.1 is a dropout (0).
    return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="net_2")(y)


class JointBlock(nn.Module):
  """diffusers JointTransformerBlock: (x (B, N, h), c (B, L, h), key_mask, temb (B, h)) -> (x, c or None)."""
  hidden_size: int
  num_heads: int
  head_dim: int
  context_pre_only: bool
  use_dual_attention: bool
  qk_norm: str | None
  joint_attention: str
  attn_impl: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, key_mask: jax.Array | None, temb: jax.Array):
    h = self.hidden_size
    attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, qk_norm=self.qk_norm, kind=self.joint_attention,
                impl=self.attn_impl, dtype=self.dtype)
    if self.use_dual_attention:  # SD35AdaLayerNormZeroX.
      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
       gate_msa2) = AdaModulation(h, 9, self.dtype, name="norm1")(temb)
    else:  # AdaLayerNormZero.
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaModulation(h, 6, self.dtype,
                                                                                     name="norm1")(temb)
    norm_x = layer_norm_no_affine(x, NORM_EPS)
    if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), in that order.
      c_scale, c_shift = AdaModulation(h, 2, self.dtype, name="norm1_context")(temb)
      norm_c = modulate(layer_norm_no_affine(c, NORM_EPS), c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaModulation(
          h, 6, self.dtype, name="norm1_context")(temb)
      norm_c = modulate(layer_norm_no_affine(c, NORM_EPS), c_shift_msa, c_scale_msa)

    x_attn, c_attn = JointAttention(h, context_pre_only=self.context_pre_only, name="attn", **attn)(
        modulate(norm_x, shift_msa, scale_msa), norm_c, key_mask)
    x = x + gate_msa * x_attn
    if self.use_dual_attention:
      x = x + gate_msa2 * JointAttention(h, context_pre_only=None, name="attn2", **attn)(
          modulate(norm_x, shift_msa2, scale_msa2))
    y = modulate(layer_norm_no_affine(x, NORM_EPS), shift_mlp, scale_mlp)
    x = logical_constraint(x + gate_mlp * FeedForward(h, self.dtype, name="ff")(y), ACT_AXES)
    if self.context_pre_only:
      return x, None
    c = c + c_gate_msa * c_attn
    y = modulate(layer_norm_no_affine(c, NORM_EPS), c_shift_mlp, c_scale_mlp)
    c = logical_constraint(c + c_gate_mlp * FeedForward(h, self.dtype, name="ff_context")(y), TEXT_AXES)
    return x, c


class MMDiT(nn.Module):
  """SD3 / SD3.5 MM-DiT; fields as diffusers' SD3Transformer2DModel config (see the module docstring).

  features_at: block indices whose image-token outputs (B, N, hidden) are also returned (LADD
  discriminator taps); when non-empty, __call__ returns (prediction, [features]).
  Sprint student options (as SanaDiT's; not in SD3Transformer2DModel, so such a model does not export
  to diffusers): timestep_scale (the embedder sees 1000 t x timestep_scale; 0.001 is dense time) and
  guidance_embeds (a CFG embedding: `guidance` (B,) raw CFG scale x guidance_embeds_scale, added to the
  conditioning; see TimeTextEmbed).
  """
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int | None = 96
  dual_attention_layers: Sequence[int] = ()
  qk_norm: str | None = None
  dtype: Dtype = jnp.float32
  attn_impl: str = "xla"
  joint_attention: str = "softmax"
  remat: str = "none"
  features_at: Sequence[int] = ()
  timestep_scale: float = 1.0
  guidance_embeds: bool = False
  guidance_embeds_scale: float = 0.1

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
               context_mask: jax.Array | None = None, *, guidance: jax.Array | None = None,
               deterministic: bool = True):
    """Flow velocity (B, H, W, out_channels) (and block features if features_at).

    guidance: (B,) raw CFG scales (e.g. 4.5), required when guidance_embeds (init without it uses
    zeros), refused otherwise.
    """
    del deterministic  # No dropout in SD3; kept for the trainer's API.
    if guidance is not None and not self.guidance_embeds:
      raise ValueError("guidance= was given but this MMDiT has guidance_embeds=False (model.guidance_embeds).")
    if self.guidance_embeds and guidance is None:
      if not self.is_initializing():
        raise ValueError("This MMDiT has guidance_embeds=True (a Sprint student): pass guidance=(B,) CFG scales.")
      guidance = jnp.zeros(x.shape[:1], jnp.float32)
    h = self.hidden_size
    if self.caption_projection_dim != h:
      raise ValueError(f"model.caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads x "
                       f"attention_head_dim = {h} (the text stream's width in SD3Transformer2DModel).")
    if self.joint_attention not in JOINT_ATTENTION_KINDS:
      raise ValueError(f"model.joint_attention={self.joint_attention!r}: use one of {JOINT_ATTENTION_KINDS}.")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"model.qk_norm={self.qk_norm!r}: use None or 'rms_norm' (SD3.5).")
    _, hh, ww, _ = x.shape
    p = self.patch_size
    out_channels = self.out_channels or self.in_channels

    tokens = SD3PatchEmbed(h, p, self.sample_size, self.pos_embed_max_size, self.dtype, name="pos_embed")(x)
    tokens = logical_constraint(tokens, ACT_AXES)
    # 1000 * timestep_scale is a Python float (exactly 1.0 for Sprint's dense 0.001).
    timestep = t.astype(jnp.float32) * (1000.0 * self.timestep_scale)
    g = None
    if self.guidance_embeds:
      g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), x.shape[:1]) * self.guidance_embeds_scale
    temb = TimeTextEmbed(h, self.dtype, name="time_text_embed")(timestep, pooled.astype(jnp.float32), g)
    self.sow("intermediates", "time_embedding", temb)  # For a LogVarHead (Sprint); free unless made mutable.
    ctx = dense(self.caption_projection_dim, ("caption", "embed"), dtype=self.dtype,
                name="context_embedder")(context.astype(self.dtype))
    ctx = logical_constraint(ctx, TEXT_AXES)

    block_cls = JointBlock
    if self.remat != "none":
      block_cls = nn.remat(JointBlock, policy=remat_policy(self.remat))
    dual = {int(i) for i in self.dual_attention_layers}
    features = []
    for i in range(self.num_layers):
      tokens, ctx = block_cls(h, self.num_attention_heads, self.attention_head_dim, i == self.num_layers - 1,
                              i in dual, self.qk_norm, self.joint_attention, self.attn_impl, self.dtype,
                              name=f"transformer_blocks_{i}")(tokens, ctx, context_mask, temb)
      if i in self.features_at:
        features.append(tokens)

    scale, shift = AdaModulation(h, 2, self.dtype, name="norm_out")(temb)  # AdaLayerNormContinuous.
    tokens = modulate(layer_norm_no_affine(tokens, NORM_EPS), shift, scale)
    out = dense(p * p * out_channels, ("embed", "channels"), dtype=self.dtype, kernel_init=zeros,
                name="proj_out")(tokens)
    out = unpatchify(out, hh // p, ww // p, p).astype(x.dtype)
    if self.features_at:
      return out, features
    return out


# The model config fields (diffusers' SD3Transformer2DModel names) and their defaults (diffusers').
ARCH_FIELDS = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
                   num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, dual_attention_layers=(),
                   qk_norm=None)

# The released architectures (their transformer/config.json; diffusers' parameter totals in
# tests/test_mmdit.py). `model` sections for configs/sd3_medium.py etc.: {"name": "mmdit", **arch}.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm=None)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  qk_norm="rms_norm")


def build_mmdit(model_config: Mapping[str, Any], dtype: str | None = None, **overrides) -> MMDiT:
  """MMDiT from a config's `model` section (name "mmdit", the ARCH_FIELDS, optional dtype,
  attn_impl, joint_attention, remat). dtype overrides model.dtype; `overrides` replace fields
  (e.g. features_at)."""
  c = dict(model_config)
  if c.get("name", "mmdit") != "mmdit":
    raise ValueError(f"build_mmdit builds model.name='mmdit', got {c['name']!r}.")
  kwargs = {k: c.get(k, v) for k, v in ARCH_FIELDS.items()}
  kwargs["dual_attention_layers"] = tuple(int(i) for i in (kwargs["dual_attention_layers"] or ()))
  kwargs["qk_norm"] = kwargs["qk_norm"] or None
  kwargs.update(dtype=dtype_from_name(dtype or c.get("dtype", "float32"), "model.dtype"),
                attn_impl=c.get("attn_impl", "xla"), joint_attention=c.get("joint_attention", "softmax"),
                remat=c.get("remat", "none"), timestep_scale=float(c.get("timestep_scale", 1.0)),
                guidance_embeds=bool(c.get("guidance_embeds", False)),
                guidance_embeds_scale=float(c.get("guidance_embeds_scale", 0.1)))
  kwargs.update(overrides)
  if kwargs["joint_attention"] not in JOINT_ATTENTION_KINDS:
    raise ValueError(f"model.joint_attention={kwargs['joint_attention']!r}: use one of {JOINT_ATTENTION_KINDS}.")
  if kwargs["qk_norm"] not in QK_NORMS:
    raise ValueError(f"model.qk_norm={kwargs['qk_norm']!r}: use None or 'rms_norm' (SD3.5).")
  bad = [i for i in kwargs["dual_attention_layers"] if not 0 <= i < kwargs["num_layers"]]
  if bad:
    raise ValueError(f"model.dual_attention_layers has {bad}, outside 0..{kwargs['num_layers'] - 1}.")
  return MMDiT(**kwargs)


def dummy_inputs(model_config: Mapping[str, Any], latent_hw: tuple[int, int], text_length: int, batch: int = 1):
  """ShapeDtypeStructs (latents, t, context, pooled, context_mask) for jax.eval_shape / init."""
  c = {**ARCH_FIELDS, **dict(model_config)}
  return (jax.ShapeDtypeStruct((batch, *latent_hw, c["in_channels"]), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length, c["joint_attention_dim"]), jnp.float32),
          jax.ShapeDtypeStruct((batch, c["pooled_projection_dim"]), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_length), jnp.int32))


def init_args(model_config: Mapping[str, Any]) -> tuple:
  """The smallest inputs that init an MMDiT (one patch, one text token; parameter shapes do not depend on them)."""
  p = dict(model_config).get("patch_size", ARCH_FIELDS["patch_size"])
  return dummy_inputs(model_config, (p, p), 1)


def abstract_param_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every leaf of the params tree, by jax.eval_shape (no allocation)."""
  model = build_mmdit(model_config)
  tree = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *init_args(model_config))["params"]
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
  return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def param_count(model_config: Mapping[str, Any], by_module: bool = False):
  """Trainable parameters (diffusers' sum(p.numel() for p in parameters()): the pos_embed buffer is
  left out). by_module: {top-level module: count} instead of the total."""
  counts: dict[str, int] = {}
  for name, shape in abstract_param_shapes(model_config).items():
    if name in FROZEN_PARAMS:
      continue
    top = name.split("/")[0]
    counts[top] = counts.get(top, 0) + math.prod(shape)
  return counts if by_module else sum(counts.values())
