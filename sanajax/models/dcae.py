"""Deep-compression autoencoder (DC-AE, Chen et al. 2024) in Flax Linen, NHWC.

Mirrors diffusers' `AutoencoderDC` (models/autoencoders/autoencoder_dc.py) module by module so
that real weights load with a key mapping (`params_from_diffusers_state_dict`):

  encoder: conv_in -> per stage [ResBlock | EfficientViTBlock] x L, then DCDownBlock2d
           (space-to-channel shortcut) -> conv_out + channel-averaging shortcut
  decoder: conv_in + channel-repeat shortcut -> per stage (deepest first) DCUpBlock2d
           (channel-to-space shortcut), then blocks x L -> norm_out -> act -> conv_out

Parameter names follow the diffusers state-dict keys with list indices folded into the module
name: torch `encoder.down_blocks.3.1.attn.to_qkv_multiscale.0.proj_in.weight` is Flax
`encoder/down_blocks_3_1/attn/to_qkv_multiscale_0/proj_in/kernel`. RMSNorm weights are `scale`.

Logical axis names (one small set for the whole AE; a sharding config maps them to mesh axes):
  conv kernels   (kh, kw, in/groups, out) -> ("conv_h", "conv_w", "conv_in", "conv_out")
  dense kernels  (in, out)                -> ("conv_in", "conv_out")
  biases, norms  (channels,)              -> ("conv_out",)
Activations are (B, H, W, C) throughout; attention tokens are (B, H*W, heads, head_dim).

Numerics: parameters are float32; `dtype` is the compute dtype. RMSNorm statistics and the
linear-attention state are float32 (as diffusers' RMSNorm and SanaMultiscaleAttnProcessor2_0).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from sanajax.dtypes import dtype_from_name
from sanajax.kernels import linear_attention
from sanajax.kernels.depthwise_conv import depthwise_conv2d

# diffusers' RMSNorm eps everywhere in AutoencoderDC (get_normalization default, GLUMBConv, norm_out).
NORM_EPS = 1e-5
# SanaMultiscaleLinearAttention's default eps (the DC-AE never overrides it).
ATTN_EPS = 1e-15
# GLUMBConv(expand_ratio=4) as built by diffusers' EfficientViTBlock.
GLU_EXPAND_RATIO = 4
# Spatial factor of every DCDownBlock2d / DCUpBlock2d.
FACTOR = 2

# torch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
# i.e. variance 1/(3 fan_in); keeping it means a from-scratch Flax AE starts like the torch one.
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
DENSE_AXES = ("conv_in", "conv_out")
CHANNEL_AXES = ("conv_out",)


# --------------------------------------------------------------------------- space <-> channel

def pixel_unshuffle(x: jax.Array, factor: int = FACTOR) -> jax.Array:
  """(B, H, W, C) -> (B, H/f, W/f, C*f*f), channel index c*f*f + i*f + j as torch's pixel_unshuffle."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)  # (b, h', i, w', j, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # (b, h', w', c, i, j)
  return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: jax.Array, factor: int = FACTOR) -> jax.Array:
  """(B, H, W, C*f*f) -> (B, H*f, W*f, C); the inverse of `pixel_unshuffle` (torch's order)."""
  b, h, w, cff = x.shape
  c = cff // (factor * factor)
  x = x.reshape(b, h, w, c, factor, factor)  # (b, h, w, c, i, j)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (b, h, i, w, j, c)
  return x.reshape(b, h * factor, w * factor, c)


def channel_average(x: jax.Array, group_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, C/g): mean over consecutive channel groups (torch unflatten + mean)."""
  *lead, c = x.shape
  return x.reshape(*lead, c // group_size, group_size).mean(axis=-1)


def channel_repeat(x: jax.Array, repeats: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, C*r): each channel repeated r times in place (repeat_interleave)."""
  return jnp.repeat(x, repeats, axis=-1)


# --------------------------------------------------------------------------- layers

def _act(name: str | None) -> Callable[[jax.Array], jax.Array]:
  """diffusers' get_activation names -> jax functions (torch's GELU is the exact erf form)."""
  acts = {"silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "relu6": nn.relu6,
          "gelu": lambda x: nn.gelu(x, approximate=False), None: lambda x: x}
  if name not in acts:
    raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(k for k in acts if k)}.")
  return acts[name]


def _conv(features: int, kernel: int, *, stride: int = 1, groups: int = 1, bias: bool = True,
          dtype: Any = jnp.float32, name: str | None = None) -> nn.Conv:
  """torch Conv2d(k, stride, padding=k//2, groups) as a Flax NHWC conv with logical axes."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(_torch_default_init, CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES),
                 name=name)


def _dense(features: int, *, dtype: Any, name: str) -> nn.Dense:
  """torch Linear(bias=False) with logical axes; kernel (in, out)."""
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(_torch_default_init, DENSE_AXES), name=name)


class DepthwiseConv(nn.Module):
  """torch Conv2d(C, C, k, padding=k//2, groups=C): (B,H,W,C) -> (B,H,W,C); kernel (k, k, 1, C).

  Computed as k*k shifted multiply-adds rather than lax.conv with feature_group_count: on
  XLA:CPU the gradient of the grouped conv was ~5x slower (measured: GLUMBConv(64) fwd+bwd at
  8x8, batch 32, 777 ms with lax.conv). Same parameter layout as nn.Conv, so weights map 1:1.
  """
  kernel_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(_torch_default_init, CONV_AXES), (k, k, 1, c),
                        jnp.float32).astype(self.dtype)
    out = depthwise_conv2d(x.astype(self.dtype), kernel)
    if self.use_bias:
      out = out + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES), (c,),
                             jnp.float32).astype(self.dtype)
    return out


class GroupedPointwiseConv(nn.Module):
  """torch Conv2d(C, C, 1, groups=g, bias=False): (B,H,W,C) -> (B,H,W,C); kernel (1, 1, C/g, C).

  A batched einsum over groups instead of lax.conv(feature_group_count=g), for the same
  XLA:CPU gradient cost reason as DepthwiseConv; output channel o reads group o // (C/g).
  """
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g = x.shape[-1], self.groups
    kernel = self.param("kernel", nn.with_logical_partitioning(_torch_default_init, CONV_AXES), (1, 1, c // g, c),
                        jnp.float32).astype(self.dtype)
    xg = x.astype(self.dtype).reshape(*x.shape[:-1], g, c // g)
    kg = kernel[0, 0].reshape(c // g, g, c // g)  # (in per group, group, out per group)
    return jnp.einsum("...gi,igo->...go", xg, kg).reshape(x.shape)


class RMSNorm(nn.Module):
  """diffusers RMSNorm(elementwise_affine=True, bias=True) over the channel (last) axis.

  x * rsqrt(mean(x^2) + eps) * scale + bias, statistics in float32. (B, ..., C) -> same shape.
  """
  eps: float = NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), CHANNEL_AXES), (c,),
                       jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES), (c,),
                      jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * scale + bias).astype(self.dtype)


def _norm(norm_type: str, dtype: Any, name: str) -> nn.Module:
  if norm_type != "rms_norm":
    # batch_norm / layer_norm exist in diffusers but no released DC-AE uses them in the blocks.
    raise ValueError(f"DC-AE norm {norm_type!r} is not supported; use 'rms_norm' (all released DC-AEs).")
  return RMSNorm(dtype=dtype, name=name)


class ResBlock(nn.Module):
  """conv3x3(+b) -> act -> conv3x3(no b) -> RMSNorm, plus the identity. (B,H,W,C) -> (B,H,W,C)."""
  channels: int
  norm_type: str = "rms_norm"
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.channels, 3, dtype=self.dtype, name="conv1")(x)
    h = _act(self.act_fn)(h)
    h = _conv(self.channels, 3, bias=False, dtype=self.dtype, name="conv2")(h)
    h = _norm(self.norm_type, self.dtype, "norm")(h)
    return h + x


class MultiscaleProjection(nn.Module):
  """SanaMultiscaleAttentionProjection: depthwise kxk then 1x1 grouped by (q|k|v, head).

  (B, H, W, 3*inner) -> same shape; both convs have no bias.
  """
  num_heads: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = DepthwiseConv(self.kernel_size, use_bias=False, dtype=self.dtype, name="proj_in")(x)
    return GroupedPointwiseConv(3 * self.num_heads, dtype=self.dtype, name="proj_out")(x)


class MultiscaleLinearAttention(nn.Module):
  """SanaMultiscaleLinearAttention (residual_connection=True). (B,H,W,C) -> (B,H,W,C).

  q, k, v = 1x1 projections (concatenated as [q|k|v] on channels); each kernel size adds a
  depthwise-aggregated copy; the (1+S)*3*inner channels are then read as (1+S)*heads groups of
  [q_h|k_h|v_h] (diffusers' reshape to (B, -1, 3*D, N)), ReLU on q and k, linear attention,
  to_out, RMSNorm, + x.

  diffusers switches to an N x N "quadratic" form when H*W <= head_dim; that form is the same
  sum, num/(den + eps), only ordered differently, so the linear kernel is used for every size.
  """
  channels: int
  head_dim: int = 32
  kernel_sizes: Sequence[int] = (5,)
  norm_type: str = "rms_norm"
  eps: float = ATTN_EPS
  attn_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, _ = x.shape
    num_heads = self.channels // self.head_dim  # mult = 1.0 in EfficientViTBlock.
    inner = num_heads * self.head_dim
    qkv = jnp.concatenate([_dense(inner, dtype=self.dtype, name=n)(x) for n in ("to_q", "to_k", "to_v")], axis=-1)
    scales = [qkv] + [MultiscaleProjection(num_heads, k, dtype=self.dtype, name=f"to_qkv_multiscale_{i}")(qkv)
                      for i, k in enumerate(self.kernel_sizes)]
    h = jnp.concatenate(scales, axis=-1)  # (B, H, W, (1+S)*3*inner)
    h = h.reshape(b, hgt * wid, -1, 3, self.head_dim)  # (B, N, (1+S)*heads, q|k|v, D)
    q, k, v = h[..., 0, :], h[..., 1, :], h[..., 2, :]
    # One dtype for q, k, v (the Pallas kernels take no mix); the kernel applies the ReLU to q and k and
    # keeps its state, normaliser and division in float32 whatever the dtype, so the values match an fp32 v.
    out = linear_attention(q, k, v.astype(q.dtype), eps=self.eps, impl=self.attn_impl)
    out = out.astype(self.dtype).reshape(b, hgt, wid, -1)
    out = _dense(self.channels, dtype=self.dtype, name="to_out")(out)
    out = _norm(self.norm_type, self.dtype, "norm_out")(out)
    return out + x


class GLUMBConv(nn.Module):
  """GLUMBConv(expand_ratio=4, norm rms_norm, residual). (B,H,W,C) -> (B,H,W,C).

  1x1 C->2*4C (+b), SiLU, depthwise 3x3 (+b), split x|gate, x*SiLU(gate), 1x1 4C->C (no b), RMSNorm, + x.
  """
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = int(GLU_EXPAND_RATIO * self.channels)
    h = _conv(2 * hidden, 1, dtype=self.dtype, name="conv_inverted")(x)
    h = nn.silu(h)
    h = DepthwiseConv(3, dtype=self.dtype, name="conv_depth")(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * nn.silu(gate)
    h = _conv(self.channels, 1, bias=False, dtype=self.dtype, name="conv_point")(h)
    h = RMSNorm(dtype=self.dtype, name="norm")(h)
    return h + x


class EfficientViTBlock(nn.Module):
  """Multi-scale ReLU linear attention (context) then GLUMBConv (local). (B,H,W,C) -> same."""
  channels: int
  head_dim: int = 32
  qkv_multiscales: Sequence[int] = (5,)
  norm_type: str = "rms_norm"
  attn_eps: float = ATTN_EPS
  attn_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = MultiscaleLinearAttention(self.channels, self.head_dim, tuple(self.qkv_multiscales), self.norm_type,
                                  self.attn_eps, self.attn_impl, self.dtype, name="attn")(x)
    return GLUMBConv(self.channels, self.dtype, name="conv_out")(x)


class DCDownBlock2d(nn.Module):
  """Downsample x2. (B,H,W,Cin) -> (B,H/2,W/2,Cout).

  "Conv" type: 3x3 stride-2 conv; "pixel_unshuffle" type: 3x3 conv to Cout/4 then unshuffle.
  Shortcut: pixel-unshuffle the input (Cin*4 channels) and average groups of Cin*4/Cout.
  """
  out_channels: int
  pixel_unshuffle: bool = False
  shortcut: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ratio = FACTOR * FACTOR
    if self.pixel_unshuffle:
      h = pixel_unshuffle(_conv(self.out_channels // out_ratio, 3, dtype=self.dtype, name="conv")(x))
    else:
      h = _conv(self.out_channels, 3, stride=FACTOR, dtype=self.dtype, name="conv")(x)
    if self.shortcut:
      h = h + channel_average(pixel_unshuffle(x), x.shape[-1] * out_ratio // self.out_channels)
    return h


class DCUpBlock2d(nn.Module):
  """Upsample x2. (B,H,W,Cin) -> (B,2H,2W,Cout).

  "interpolate" type: nearest x2 then 3x3 conv; "pixel_shuffle" type: 3x3 conv to 4*Cout then shuffle.
  Shortcut: repeat each channel 4*Cout/Cin times, then pixel-shuffle.
  """
  out_channels: int
  interpolate: bool = False
  shortcut: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.interpolate:
      up = jnp.repeat(jnp.repeat(x, FACTOR, axis=1), FACTOR, axis=2)  # F.interpolate(mode="nearest")
      h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv")(up)
    else:
      h = pixel_shuffle(_conv(self.out_channels * FACTOR * FACTOR, 3, dtype=self.dtype, name="conv")(x))
    if self.shortcut:
      h = h + pixel_shuffle(channel_repeat(x, self.out_channels * FACTOR * FACTOR // x.shape[-1]))
    return h


def _per_stage(value, n: int) -> tuple:
  """diffusers accepts a str for 'the same in every stage'; returns an n-tuple."""
  return (value,) * n if isinstance(value, str) else tuple(value)


class Encoder(nn.Module):
  """Images (B,H,W,in) -> raw latent (B,H/f,W/f,latent), f = 2**(stages-1)."""
  latent_channels: int
  head_dim: int
  block_types: Sequence[str]
  block_out_channels: Sequence[int]
  layers_per_block: Sequence[int]
  qkv_multiscales: Sequence[Sequence[int]]
  downsample_block_type: str = "Conv"
  out_shortcut: bool = True
  attn_eps: float = ATTN_EPS
  attn_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chans, layers = tuple(self.block_out_channels), tuple(self.layers_per_block)
    n = len(chans)
    types = _per_stage(self.block_types, n)
    unshuffle = self.downsample_block_type == "pixel_unshuffle"
    x = x.astype(self.dtype)
    if layers[0] > 0:
      x = _conv(chans[0], 3, dtype=self.dtype, name="conv_in")(x)
    else:  # The first stage is skipped: conv_in downsamples straight to stage 1's width.
      x = DCDownBlock2d(chans[1], unshuffle, shortcut=False, dtype=self.dtype, name="conv_in")(x)
    for i, (c, num) in enumerate(zip(chans, layers)):
      for j in range(num):
        x = _block(types[i], c, self.head_dim, tuple(self.qkv_multiscales[i]), "rms_norm", "silu",
                   self.attn_eps, self.attn_impl, self.dtype, f"down_blocks_{i}_{j}")(x)
      if i < n - 1 and num > 0:
        x = DCDownBlock2d(chans[i + 1], unshuffle, shortcut=True, dtype=self.dtype, name=f"down_blocks_{i}_{num}")(x)
    h = _conv(self.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)
    if self.out_shortcut:
      h = h + channel_average(x, chans[-1] // self.latent_channels)
    return h


class Decoder(nn.Module):
  """Raw latent (B,h,w,latent) -> images (B,h*f,w*f,out)."""
  out_channels: int
  head_dim: int
  block_types: Sequence[str]
  block_out_channels: Sequence[int]
  layers_per_block: Sequence[int]
  qkv_multiscales: Sequence[Sequence[int]]
  norm_types: Sequence[str]
  act_fns: Sequence[str]
  upsample_block_type: str = "interpolate"
  in_shortcut: bool = True
  conv_act_fn: str = "relu"
  attn_eps: float = ATTN_EPS
  attn_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans, layers = tuple(self.block_out_channels), tuple(self.layers_per_block)
    n = len(chans)
    types, norms, acts = (_per_stage(v, n) for v in (self.block_types, self.norm_types, self.act_fns))
    interpolate = self.upsample_block_type == "interpolate"
    z = z.astype(self.dtype)
    x = _conv(chans[-1], 3, dtype=self.dtype, name="conv_in")(z)
    if self.in_shortcut:
      x = x + channel_repeat(z, chans[-1] // z.shape[-1])
    for i in reversed(range(n)):
      j0 = 0
      if i < n - 1 and layers[i] > 0:
        x = DCUpBlock2d(chans[i], interpolate, shortcut=True, dtype=self.dtype, name=f"up_blocks_{i}_0")(x)
        j0 = 1
      for j in range(layers[i]):
        x = _block(types[i], chans[i], self.head_dim, tuple(self.qkv_multiscales[i]), norms[i], acts[i],
                   self.attn_eps, self.attn_impl, self.dtype, f"up_blocks_{i}_{j0 + j}")(x)
    x = RMSNorm(dtype=self.dtype, name="norm_out")(x)
    x = _act(self.conv_act_fn)(x)
    if layers[0] > 0:
      return _conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)
    return DCUpBlock2d(self.out_channels, interpolate, shortcut=False, dtype=self.dtype, name="conv_out")(x)


def _block(block_type: str, channels: int, head_dim: int, multiscales: tuple, norm_type: str, act_fn: str,
           attn_eps: float, attn_impl: str, dtype: Any, name: str) -> nn.Module:
  if block_type == "ResBlock":
    return ResBlock(channels, norm_type, act_fn, dtype, name=name)
  if block_type == "EfficientViTBlock":
    return EfficientViTBlock(channels, head_dim, multiscales, norm_type, attn_eps, attn_impl, dtype, name=name)
  raise ValueError(f"Unknown DC-AE block type {block_type!r}; expected 'ResBlock' or 'EfficientViTBlock'.")


# --------------------------------------------------------------------------- the autoencoder

class DCAE(nn.Module):
  """AutoencoderDC. Field names are diffusers' config names (tuples instead of lists).

  encode: images (B, H, W, in_channels) in [-1, 1] -> raw latent (B, H/f, W/f, latent_channels);
  decode: the inverse; __call__ = decode(encode(x)). `scaling_factor` is NOT applied here: the
  diffusion side multiplies latents by it (z * scaling_factor), as diffusers pipelines do.
  """
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: Sequence[str] = ("ResBlock",) * 6
  decoder_block_types: Sequence[str] = ("ResBlock",) * 6
  encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: Sequence[str] = ("rms_norm",) * 6
  decoder_act_fns: Sequence[str] = ("silu",) * 6
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0
  attn_eps: float = ATTN_EPS
  attn_impl: str = "xla"
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.latent_channels, self.attention_head_dim, self.encoder_block_types,
                           self.encoder_block_out_channels, self.encoder_layers_per_block,
                           self.encoder_qkv_multiscales, self.downsample_block_type, self.encoder_out_shortcut,
                           self.attn_eps, self.attn_impl, self.dtype)
    self.decoder = Decoder(self.in_channels, self.attention_head_dim, self.decoder_block_types,
                           self.decoder_block_out_channels, self.decoder_layers_per_block,
                           self.decoder_qkv_multiscales, self.decoder_norm_types, self.decoder_act_fns,
                           self.upsample_block_type, self.decoder_in_shortcut, self.decoder_conv_act_fn,
                           self.attn_eps, self.attn_impl, self.dtype)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [-1, 1], H and W multiples of f -> raw latent (B, H/f, W/f, latent), float32."""
    f = self.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"DC-AE encode needs H and W divisible by {f}; got images of shape {images.shape}.")
    return self.encoder(images).astype(jnp.float32)

  def decode(self, latent: jax.Array) -> jax.Array:
    """Raw latent (B, h, w, latent) -> images (B, h*f, w*f, 3), float32, not clipped."""
    return self.decoder(latent).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))


CONFIG_FIELDS = ("in_channels", "latent_channels", "attention_head_dim", "encoder_block_types",
                  "decoder_block_types", "encoder_block_out_channels", "decoder_block_out_channels",
                  "encoder_layers_per_block", "decoder_layers_per_block", "encoder_qkv_multiscales",
                  "decoder_qkv_multiscales", "upsample_block_type", "downsample_block_type",
                  "decoder_norm_types", "decoder_act_fns", "scaling_factor")
OPTIONAL_FIELDS = ("encoder_out_shortcut", "decoder_in_shortcut", "decoder_conv_act_fn", "attn_eps")


def _frozen(value):
  """Lists (ConfigDict fields) -> nested tuples, so the module stays hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def diffusers_kwargs(ae_config: ml_collections.ConfigDict) -> dict:
  """The AutoencoderDC(**kwargs) equivalent of an `ae` config (used by tests and converters)."""
  missing = [f for f in CONFIG_FIELDS if f not in ae_config]
  if missing:
    raise KeyError(f"DC-AE config lacks fields {missing}; see configs/dcae_f32c32.py for the full list.")
  kw = {f: _frozen(ae_config[f]) for f in CONFIG_FIELDS}
  kw.update({f: _frozen(ae_config[f]) for f in OPTIONAL_FIELDS[:-1] if f in ae_config})
  return kw


def build_dcae(ae_config: ml_collections.ConfigDict) -> DCAE:
  """DCAE from an `ae` ConfigDict (diffusers field names plus dtype and attn_impl)."""
  kw = diffusers_kwargs(ae_config)
  if "attn_eps" in ae_config:
    kw["attn_eps"] = float(ae_config.attn_eps)
  return DCAE(**kw, attn_impl=ae_config.get("attn_impl", "xla"),
              dtype=dtype_from_name(ae_config.get("dtype", "float32"), "ae.dtype"))


def downsample_factor(ae_config: ml_collections.ConfigDict) -> int:
  """Spatial compression f: each stage after the first halves H and W (32 for f32c32)."""
  return 2 ** (len(ae_config.encoder_block_out_channels) - 1)


# --------------------------------------------------------------------------- losses / metrics

def reconstruction_loss(recon: jax.Array, images: jax.Array) -> jax.Array:
  """Mean L1 + mean MSE over (B, H, W, C), in float32; a scalar.

  MSE is what PSNR measures; L1 keeps a useful gradient once errors are small (MSE's vanishes),
  which sharpens the flat-colour edges of the shapes data. No perceptual/GAN terms: the tiny AE
  only has to reach a PSNR target on synthetic shapes.
  """
  d = recon.astype(jnp.float32) - images.astype(jnp.float32)
  return jnp.mean(jnp.abs(d)) + jnp.mean(d * d)


def psnr(recon: jax.Array, images: jax.Array) -> jax.Array:
  """PSNR in dB for images in [-1, 1], averaged over the batch; a scalar.

  Both are mapped to [0, 1] (peak 1) and the reconstruction is clipped there first, as it
  would be when saved as an image. (B, H, W, C) -> ().
  """
  r = jnp.clip((recon.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  mse = jnp.mean((r - x) ** 2, axis=tuple(range(1, x.ndim)))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))  # 1e-10: 100 dB cap for exact copies.


# --------------------------------------------------------------------------- diffusers weights

def _flax_path(torch_key: str) -> tuple[tuple[str, ...], str]:
  """'encoder.down_blocks.3.1.attn.to_q.weight' -> (('encoder', 'down_blocks_3_1', 'attn', 'to_q'), 'weight')."""
  parts: list[str] = []
  for p in torch_key.split("."):
    if p.isdigit() and parts:
      parts[-1] += "_" + p
    else:
      parts.append(p)
  return tuple(parts[:-1]), parts[-1]


def params_from_diffusers_state_dict(state_dict: Mapping[str, Any], ae_config: ml_collections.ConfigDict) -> dict:
  """diffusers AutoencoderDC state dict -> the Flax `params` tree of `build_dcae(ae_config)` (unboxed).

  Layouts: conv weight (O, I/g, kh, kw) -> kernel (kh, kw, I/g, O); linear weight (O, I) -> kernel
  (I, O); 1-D `weight` (RMSNorm) -> scale; biases unchanged. Values may be torch tensors or arrays.
  Raises if a key is unknown or the result does not match the model's parameter shapes.
  """
  params: dict = {}
  for key, value in state_dict.items():
    arr = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, np.float32)
    path, leaf = _flax_path(key)
    if leaf == "weight":
      if arr.ndim == 4:
        leaf, arr = "kernel", arr.transpose(2, 3, 1, 0)
      elif arr.ndim == 2:
        leaf, arr = "kernel", arr.T
      elif arr.ndim == 1:
        leaf = "scale"
    elif leaf != "bias":
      raise KeyError(f"Unexpected DC-AE state-dict entry {key!r} (leaf {leaf!r}).")
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(arr)

  # Check against the Flax model's own tree so a wrong config fails here, not deep inside apply.
  model = build_dcae(ae_config)
  f = downsample_factor(ae_config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, f, f, model.in_channels))))["params"])
  want = {k: v.shape for k, v in flatten_dict(shapes, sep="/").items()}
  got = {k: v.shape for k, v in flatten_dict(params, sep="/").items()}
  if want != got:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"diffusers weights do not fit this DC-AE config: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}, wrong shapes {[(k, got[k], want[k]) for k in wrong[:5]]}.")
  return params


def param_count(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) params tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))
