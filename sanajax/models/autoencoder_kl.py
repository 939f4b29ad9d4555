"""The KL autoencoder of Stable Diffusion (SD3 / SD3.5: 16 latent channels) in Flax Linen, NHWC.

Mirrors diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py) module by module,
so real weights load by a key mapping (sanajax/models/autoencoder_kl_diffusers.py):

  encoder: conv_in -> per stage DownEncoderBlock2D (layers_per_block ResnetBlock2D, then
           Downsample2D except in the last stage) -> mid block (resnet, self-attention, resnet)
           -> GroupNorm -> SiLU -> conv_out to 2 * latent_channels (mean | logvar)
           [-> quant_conv 1x1]
  decoder: [post_quant_conv 1x1 ->] conv_in -> mid block -> per stage, deepest first,
           UpDecoderBlock2D (layers_per_block + 1 resnets, then Upsample2D except in the last)
           -> GroupNorm -> SiLU -> conv_out

ResnetBlock2D: GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (through a 1x1
`conv_shortcut` when the width changes). Downsample2D: zero pad (bottom 1, right 1), then a 3x3
stride-2 conv with no padding. Upsample2D: nearest-neighbour x2, then a 3x3 conv. The mid-block
attention is diffusers' `Attention(_from_deprecated_attn_block=True)`: GroupNorm, then ONE head of
width C over the H*W tokens (q, k, v, to_out linear with bias), plus the input.

Parameter names follow the diffusers state-dict keys with list indices folded into the module
name (as sanajax.models.dcae): torch `decoder.up_blocks.1.resnets.0.conv_shortcut.weight` is Flax
`decoder/up_blocks_1/resnets_0/conv_shortcut/kernel`, `...attentions.0.to_out.0` is
`attentions_0/to_out_0`; GroupNorm weights are `scale`.

Logical axis names: the DC-AE's set (dcae.CONV_AXES, DENSE_AXES, CHANNEL_AXES), so the same
sharding rules apply to either autoencoder.

Numerics: parameters are float32; `dtype` is the compute dtype. GroupNorm statistics and the
attention softmax are float32 (diffusers upcasts the softmax, `upcast_softmax=True`).

Latents are RAW here: the diffusion side uses (z - shift_factor) * scaling_factor, as the
diffusers SD3 pipeline does (SD3: scaling 1.5305, shift 0.0609).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sanajax.dtypes import dtype_from_name
from sanajax.models.dcae import CHANNEL_AXES, CONV_AXES, DENSE_AXES, _act, _torch_default_init

# diffusers' eps of every GroupNorm in the KL autoencoder (resnets, attention, norm_out).
NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range before exp.
LOGVAR_RANGE = (-30.0, 20.0)
# The only block types of AutoencoderKL's released configs (SD 1.x / 2.x / XL / 3 / 3.5, FLUX).
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"


def _conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None, dtype: Any,
          name: str) -> nn.Conv:
  """torch Conv2d(k, stride, padding (default k // 2), bias) as a Flax NHWC conv with logical axes."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(_torch_default_init, CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES), name=name)


def _linear(features: int, *, dtype: Any, name: str) -> nn.Dense:
  """torch Linear(bias=True) with logical axes; kernel (in, out)."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(_torch_default_init, DENSE_AXES),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES), name=name)


class GroupNorm(nn.Module):
  """torch GroupNorm(groups, C, eps, affine) over (H, W, C/groups) per group; statistics in float32.

  (B, H, W, C) -> same shape, in `dtype`. Biased variance, as torch.
  """
  num_groups: int
  eps: float = NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by norm_num_groups={self.num_groups}.")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), CHANNEL_AXES), (c,),
                       jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), CHANNEL_AXES), (c,),
                      jnp.float32)
    xg = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.eps)
    return (xg.reshape(b, h, w, c) * scale + bias).astype(self.dtype)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D without a time embedding. (B, H, W, Cin) -> (B, H, W, out_channels)."""
  out_channels: int
  num_groups: int
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _act(self.act_fn)
    h = act(GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
    h = act(GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)  # dropout 0 in every released VAE
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return x.astype(self.dtype) + h


class Downsample2D(nn.Module):
  """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C): zero pad bottom/right by 1, 3x3 stride-2 conv, no padding."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # torch F.pad(x, (0, 1, 0, 1)): W then H, after only
    return _conv(self.channels, 3, stride=2, padding=0, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """(B, H, W, C) -> (B, 2H, 2W, C): nearest-neighbour x2 (F.interpolate), then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, dtype=self.dtype, name="conv")(x)


class SpatialSelfAttention(nn.Module):
  """The mid block's attention: GroupNorm, one head of width C over H*W tokens, to_out, + x.

  (B, H, W, C) -> (B, H, W, C). Softmax in float32 with scale 1/sqrt(C). At SD3's 1024 px the
  encoder's mid block has 128*128 tokens: a (B, 1, 16384, 16384) float32 score matrix (1 GiB per
  image), which is why high resolutions decode in tiles (dcae_tiling.decode_latents).
  """
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = GroupNorm(self.num_groups, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
    q, k, v = (_linear(c, dtype=self.dtype, name=n)(t) for n in ("to_q", "to_k", "to_v"))
    # jax.nn.dot_product_attention: float32 logits and softmax, cuDNN on GPU where it supports the shape.
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
    out = _linear(c, dtype=self.dtype, name="to_out_0")(out)
    return out + x.astype(self.dtype)


class MidBlock(nn.Module):
  """UNetMidBlock2D(num_layers=1): resnet, [attention], resnet at constant width. (B,H,W,C) -> same."""
  num_groups: int
  add_attention: bool = True
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.num_groups, self.act_fn, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.num_groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(c, self.num_groups, self.act_fn, self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  """layers ResnetBlock2D, then a Downsample2D unless last. (B, H, W, Cin) -> (B, H/2 or H, W/2 or W, C)."""
  channels: int
  num_layers: int
  num_groups: int
  add_downsample: bool
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.channels, self.num_groups, self.act_fn, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample2D(self.channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """layers ResnetBlock2D, then an Upsample2D unless last. (B, H, W, Cin) -> (B, 2H or H, 2W or W, C)."""
  channels: int
  num_layers: int
  num_groups: int
  add_upsample: bool
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.channels, self.num_groups, self.act_fn, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2**(stages - 1)."""
  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  num_groups: int
  add_attention: bool = True
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chans = tuple(self.block_out_channels)
    x = _conv(chans[0], 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for i, c in enumerate(chans):
      x = DownEncoderBlock2D(c, self.layers_per_block, self.num_groups, i < len(chans) - 1, self.act_fn, self.dtype,
                             name=f"down_blocks_{i}")(x)
    x = MidBlock(self.num_groups, self.add_attention, self.act_fn, self.dtype, name="mid_block")(x)
    x = _act(self.act_fn)(GroupNorm(self.num_groups, dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(2 * self.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """Raw latent (B, h, w, latent) -> images (B, h f, w f, out_channels)."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  num_groups: int
  add_attention: bool = True
  act_fn: str = "silu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans = tuple(reversed(tuple(self.block_out_channels)))
    x = _conv(chans[0], 3, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    x = MidBlock(self.num_groups, self.add_attention, self.act_fn, self.dtype, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock2D(c, self.layers_per_block + 1, self.num_groups, i < len(chans) - 1, self.act_fn,
                           self.dtype, name=f"up_blocks_{i}")(x)
    x = _act(self.act_fn)(GroupNorm(self.num_groups, dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL. Field names are diffusers' config names (a tuple for block_out_channels).

  encode: images (B, H, W, in_channels) in [-1, 1], H and W multiples of f -> the posterior mean
  (B, H/f, W/f, latent_channels), raw (neither shift nor scale applied); decode: the inverse;
  __call__ = decode(encode(x)). `encode_moments` gives (mean, logvar) for sampling / a KL term.
  The defaults are SD3's VAE (stabilityai/stable-diffusion-3-medium-diffusers/vae).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  act_fn: str = "silu"
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    chans = tuple(self.block_out_channels)
    self.encoder = Encoder(self.latent_channels, chans, self.layers_per_block, self.norm_num_groups,
                           self.mid_block_add_attention, self.act_fn, self.dtype)
    self.decoder = Decoder(self.out_channels, chans, self.layers_per_block, self.norm_num_groups,
                           self.mid_block_add_attention, self.act_fn, self.dtype)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, dtype=self.dtype, name="quant_conv")
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, dtype=self.dtype, name="post_quant_conv")

  @property
  def downsample_factor(self) -> int:
    """Spatial compression f (8 for every released KL VAE); dcae_tiling reads it to tile."""
    return 2 ** (len(self.block_out_channels) - 1)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, in) -> (mean, logvar), each (B, H/f, W/f, latent) float32; logvar clamped as diffusers'."""
    f = self.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"AutoencoderKL encode needs H and W divisible by {f}; got images of shape {images.shape}.")
    h = self.encoder(images)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)  # DiagonalGaussianDistribution's chunk(2, dim=1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, in) in [-1, 1] -> the posterior mean (B, H/f, W/f, latent), raw, float32."""
    return self.encode_moments(images)[0]

  def decode(self, latent: jax.Array) -> jax.Array:
    """Raw latent (B, h, w, latent) -> images (B, h f, w f, out), float32, not clipped."""
    z = latent.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))


CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                 "norm_num_groups", "act_fn", "scaling_factor", "shift_factor", "use_quant_conv",
                 "use_post_quant_conv", "mid_block_add_attention")


def build_autoencoder_kl(ae_config: ml_collections.ConfigDict) -> AutoencoderKL:
  """AutoencoderKL from an `ae` ConfigDict (CONFIG_FIELDS, any left out take the SD3 defaults, plus dtype)."""
  kw = {f: ae_config[f] for f in CONFIG_FIELDS if f in ae_config}
  if "block_out_channels" in kw:
    kw["block_out_channels"] = tuple(kw["block_out_channels"])  # hashable module field
  return AutoencoderKL(**kw, dtype=dtype_from_name(ae_config.get("dtype", "float32"), "ae.dtype"))


__all__: Sequence[str] = ("AutoencoderKL", "Encoder", "Decoder", "DownEncoderBlock2D", "UpDecoderBlock2D", "MidBlock",
                          "ResnetBlock2D", "GroupNorm", "SpatialSelfAttention", "Downsample2D", "Upsample2D",
                          "CONFIG_FIELDS", "build_autoencoder_kl", "DOWN_BLOCK_TYPE", "UP_BLOCK_TYPE")
