"""Small building blocks of the SANA linear DiT (Flax Linen, NHWC, tokens as (B, N, C)).

Parameter logical axis names (sanajax.parallel's rules map them to mesh axes):
  embed      the DiT hidden size h
  mlp        the Mix-FFN hidden size int(h * mlp_ratio) (and 2x that before the GLU split)
  heads      a fused heads * head_dim axis (q/k/v outputs, attention-out inputs)
  caption    the text-encoder hidden size (caption_channels)
  adaln      the 6h (or 2h) adaLN-single modulation axis
  time_freq  the 256 sinusoid frequencies of the timestep embedding
  channels   latent channels going in / coming out of the DiT
  None       small axes never sharded (conv taps, the 6 / 2 rows of scale_shift_table)

Activations are computed in `dtype` (float32 or bfloat16); parameters stay float32 and every
reduction (norm statistics, softmax, linear-attention state) is done in float32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax.kernels.depthwise_conv import depthwise_conv2d
from sanajax.parallel import sequence
from sanajax.parallel.context import active_plan

Dtype = Any

# SANA initialises Linears with xavier_uniform and the t-embedder / t_block / caption MLP with
# N(0, 0.02) (`initialize_weights` in sana_multi_scale.py); biases start at zero.
xavier_uniform = nn.initializers.xavier_uniform()
normal_002 = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros


# SANA's convs (GLUMBConv's three) keep PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)),
# i.e. U(+-1/sqrt(fan_in)) = variance_scaling(1/3, fan_in, uniform), and bias U(+-1/sqrt(fan_in)).
torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias(fan_in: int):
  """Bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Conv2d default."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def flat_xavier_uniform(key, shape, dtype=jnp.float32):
  """xavier_uniform of a conv kernel (kh, kw, in, out) viewed as a Linear (kh*kw*in, out).

  SANA initialises the patch-embed conv this way (`xavier_uniform_(w.view(w.shape[0], -1))`),
  which differs from Flax's conv fan (it multiplies both fans by the receptive field).
  """
  flat = xavier_uniform(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


def scale_shift_table_init(key, shape, dtype=jnp.float32):
  """randn(rows, h) / sqrt(h), as SANA's and diffusers' `scale_shift_table`."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          kernel_init=xavier_uniform, bias_init=zeros, name: str | None = None) -> nn.Dense:
  """nn.Dense with logically partitioned kernel (axes) and bias (axes[1]); params float32."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)), name=name)


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis without scale/bias; statistics in float32, result in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable scale (diffusers `RMSNorm`, elementwise_affine).

  y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32. `scale_init` is the initial value
  of every scale entry (1.0 usually; SANA's caption norm starts at y_norm_scale = 0.01).
  """
  eps: float = 1e-5
  scale_init: float = 1.0
  axis_name: str | None = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(self.scale_init),
                                                              (self.axis_name,)), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of (B,) timesteps -> (B, dim) float32.

  Equals diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`:
  freqs_i = exp(-log(max_period) * i / (dim/2)), i < dim/2. The caller passes t in the
  0..1000 convention (flow t * 1000), as SANA and diffusers do.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """MLP on the sinusoid: Linear(256, h) -> SiLU -> Linear(h, h). (B, 256) -> (B, h).

  diffusers `TimestepEmbedding` (linear_1, linear_2); init N(0, 0.02) as SANA's t_embedder.
  last_kernel_init: linear_2's kernel init (biases start at zero). The Sprint guidance embedder
  passes zeros, so a fresh one adds nothing to the conditioning (sana_dit.TimestepGuidanceEmbedding).
  """
  hidden_size: int
  dtype: Dtype = jnp.float32
  last_kernel_init: Any = normal_002

  @nn.compact
  def __call__(self, t_freq: jax.Array) -> jax.Array:
    x = dense(self.hidden_size, ("time_freq", "embed"), dtype=self.dtype, kernel_init=normal_002,
              name="linear_1")(t_freq.astype(self.dtype))
    x = nn.silu(x)
    return dense(self.hidden_size, ("embed", "embed"), dtype=self.dtype, kernel_init=self.last_kernel_init,
                 name="linear_2")(x)


class CombinedTimestepEmbedding(nn.Module):
  """diffusers `PixArtAlphaCombinedTimestepSizeEmbeddings` without size conditions.

  (B,) timesteps in the 0..1000 convention -> (B, h). Kept as its own level so parameter paths
  read `time_embed/emb/timestep_embedder/linear_1` like diffusers' state-dict keys.
  """
  hidden_size: int
  freq_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: jax.Array) -> jax.Array:
    return TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="timestep_embedder")(
        timestep_sinusoid(timestep, self.freq_dim))


class AdaLNSingle(nn.Module):
  """adaLN-single (PixArt-alpha / SANA `t_block`): the shared modulation of all blocks.

  (B,) timesteps (0..1000) -> (t6 (B, 6h), embedded_t (B, h)); t6 = Linear(SiLU(embedded_t)).
  Each block adds its own (6, h) `scale_shift_table`; the final layer uses embedded_t.
  """
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
    emb = CombinedTimestepEmbedding(self.hidden_size, dtype=self.dtype, name="emb")(timestep)
    t6 = dense(6 * self.hidden_size, ("embed", "adaln"), dtype=self.dtype, kernel_init=normal_002,
               name="linear")(nn.silu(emb))
    return t6, emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift; x (B, N, h), shift/scale (B, 1, h)."""
  return x * (1 + scale) + shift


class CaptionProjection(nn.Module):
  """SANA `CaptionEmbedder` / diffusers `PixArtAlphaTextProjection`: (B, L, caption) -> (B, L, h).

  Linear(caption, h) -> GELU(tanh) -> Linear(h, h); init N(0, 0.02) as SANA's y_embedder.
  The null-caption embedding used for CFG dropout is not here (diffusers has none either); the
  trainer drops captions by swapping in the encoded empty prompt.
  """
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    y = dense(self.hidden_size, ("caption", "embed"), dtype=self.dtype, kernel_init=normal_002,
              name="linear_1")(y.astype(self.dtype))
    y = nn.gelu(y, approximate=True)
    return dense(self.hidden_size, ("embed", "embed"), dtype=self.dtype, kernel_init=normal_002, name="linear_2")(y)


class MixFFN(nn.Module):
  """GLUMBConv (SANA's Mix-FFN): tokens (B, N, h) with N = H*W -> (B, N, h).

  1x1 conv h -> 2f (bias) + SiLU -> depthwise 3x3 (bias, zero padding 1) -> split [x, gate] ->
  x * SiLU(gate) -> 1x1 conv f -> h (no bias), f = int(h * mlp_ratio). The 1x1 convs are Dense
  layers on the channel axis (same math, no im2col); diffusers' (O, I, 1, 1) weights map to
  (I, O) kernels. The 3x3 depthwise conv is what gives SANA its positional information.
  """
  hidden_size: int
  mlp_ratio: float = 2.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    b, n, _ = x.shape
    if n != height * width:
      raise ValueError(f"MixFFN got {n} tokens for a {height}x{width} grid.")
    f = int(self.hidden_size * self.mlp_ratio)
    x = dense(2 * f, ("embed", "mlp"), dtype=self.dtype, kernel_init=torch_conv_kernel,
              bias_init=torch_conv_bias(self.hidden_size), name="conv_inverted")(x)
    x = nn.silu(x).reshape(b, height, width, 2 * f)
    x = DepthwiseConv(2 * f, 3, dtype=self.dtype, kernel_init=torch_conv_kernel, bias_init=torch_conv_bias(9),
                      axis_name="mlp", name="conv_depth")(x)
    x, gate = jnp.split(x, 2, axis=-1)
    x = (x * nn.silu(gate)).reshape(b, n, f)
    return dense(self.hidden_size, ("mlp", "embed"), use_bias=False, dtype=self.dtype, kernel_init=torch_conv_kernel,
                 name="conv_point")(x)


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv with bias, 'same' padding; parameters as nn.Conv's (kernel (k, k, 1, C), bias (C,))."""
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = torch_conv_kernel
  bias_init: Any = zeros
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, (None, None, None, self.axis_name)),
                        (k, k, 1, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.axis_name,)), (self.features,),
                      jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    plan = active_plan()
    if plan is not None and plan.sequence_parallel:
      # Rows of the grid are split over the `sequence` mesh axis: one halo row from each neighbour.
      y = sequence.depthwise_conv2d(plan, x, kernel, self.axis_name)
    else:
      y = depthwise_conv2d(x, kernel)
    return y + bias.astype(self.dtype)


def sincos_pos_embed_2d(embed_dim: int, height: int, width: int, base_size: int,
                        interpolation_scale: float) -> np.ndarray:
  """2D sin-cos positional embedding (diffusers `get_2d_sincos_pos_embed`) -> (H*W, embed_dim) float32.

  Positions are arange(n) / (n / base_size) / interpolation_scale along each axis; the first half
  of the channels embeds the column (w) coordinate, the second half the row (h) one, each as
  [sin, cos] with frequencies 1 / 10000^(i / (D/4)); tokens are row-major (h, w).
  """
  if embed_dim % 4:
    raise ValueError(f"sincos PE needs embed_dim divisible by 4, got {embed_dim}.")
  grid_h = np.arange(height, dtype=np.float64) / (height / base_size) / interpolation_scale
  grid_w = np.arange(width, dtype=np.float64) / (width / base_size) / interpolation_scale

  def emb_1d(pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  ww, hh = np.meshgrid(grid_w, grid_h)  # (H, W) each.
  emb = np.concatenate([emb_1d(ww.reshape(-1)), emb_1d(hh.reshape(-1))], axis=1)
  return emb.astype(np.float32)


class PatchEmbed(nn.Module):
  """Patchify: (B, H, W, C) -> tokens (B, H/p * W/p, h) by a p x p stride-p conv with bias.

  Optional sin-cos PE (use_pe, as SANA's 2K/4K models): base_size is the latent grid side the
  model was trained at (diffusers `sample_size // patch_size`), interpolation_scale its
  `interpolation_scale` (SANA `pe_interpolation`).
  """
  hidden_size: int
  patch_size: int = 1
  use_pe: bool = False
  pe_interpolation: float = 1.0
  pe_base_size: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    b, hh, ww, _ = x.shape
    if hh % p or ww % p:
      raise ValueError(f"Latent {hh}x{ww} is not divisible by patch size {p}.")
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(flat_xavier_uniform, (None, None, "channels", "embed")),
                bias_init=nn.with_logical_partitioning(zeros, ("embed",)), name="proj")(x.astype(self.dtype))
    gh, gw = hh // p, ww // p
    x = x.reshape(b, gh * gw, self.hidden_size)
    if self.use_pe:
      base = self.pe_base_size or gh
      pe = sincos_pos_embed_2d(self.hidden_size, gh, gw, base, self.pe_interpolation)
      x = (x.astype(jnp.float32) + pe[None]).astype(self.dtype)
    return x


def unpatchify(x: jax.Array, grid_h: int, grid_w: int, patch_size: int) -> jax.Array:
  """(B, gh*gw, p*p*C) with channels ordered (p_row, p_col, C) as diffusers -> (B, gh*p, gw*p, C)."""
  b = x.shape[0]
  p = patch_size
  x = x.reshape(b, grid_h, grid_w, p, p, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, -1)


def remat_policy(name: str) -> Any:
  """Maps a config string to a jax.checkpoint policy ("full" saves nothing)."""
  if name == "full":
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"Unknown remat policy {name!r}: use 'none', 'full' or a jax.checkpoint_policies name "
                     "such as 'dots_saveable' or 'dots_with_no_batch_dims_saveable'.")
  return policy


def logical_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names: the active sanajax.parallel plan's (see
  sanajax.parallel.context), else nn.with_logical_constraint (a no-op without a mesh and rules)."""
  plan = active_plan()
  if plan is not None:
    return plan.constrain(x, tuple(axes))
  return nn.with_logical_constraint(x, tuple(axes))
