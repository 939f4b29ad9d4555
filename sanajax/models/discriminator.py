"""LADD discriminator heads (SANA-Sprint `SanaMSCMDiscriminator` heads = StyleGAN-T `DiscHead`).

The frozen teacher is the feature network: its block outputs (B, N, h) at `head_block_ids`
(1600M reference: blocks 2, 8, 14, 19) on a noised latent are each scored by one trainable head;
the per-token logits of all heads are concatenated, (B, N * num_heads). Feature extraction lives
in sanajax.training.sprint (it runs the teacher); this module holds only the trainable heads.

One head (tokens as a 1-D sequence of length N with h channels):
    x = block_1(x)                                   SpectralConv1d(k=1) -> BatchNormLocal -> LeakyReLU(0.2)
    x = (block_9(x) + x) / sqrt(2)                   same with k=9, circular padding
    logits = SpectralConv1d(h -> 1, k=1)(x)          (B, N)
SpectralConv1d: the kernel divided by its largest singular value (kernel viewed as
(out, in * k), PyTorch's `spectral_norm(dim=0)`). The singular vectors are computed exactly from
the kernel each call (eigh of W W^T) and held constant for the gradient, as PyTorch's power
iteration does, so no power-iteration state has to live in the train state.
BatchNormLocal: batch statistics over virtual batches of 8 samples (mean/var over the samples of
the group and the tokens), eps 1e-5, learnable scale/bias; there are no running statistics.

Parameter logical axes: conv kernels (None, "embed", "embed") / (None, "embed", None), biases and
norm scales ("embed",).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sanajax.models.layers import torch_conv_bias, torch_conv_kernel

VIRTUAL_BATCH = 8  # StyleGAN-T BatchNormLocal default.


def spectral_normalize(kernel: jax.Array, eps: float = 1e-12) -> jax.Array:
  """kernel (k, in, out) / sigma_max of the (out, in * k) matrix; gradient as PyTorch's spectral_norm.

  u, v (top singular vectors) are stop-gradient constants and sigma = u^T W v, so d sigma / dW = u v^T
  (the exact derivative of the top singular value).
  """
  k, cin, cout = kernel.shape
  w = jnp.transpose(kernel, (2, 1, 0)).reshape(cout, cin * k).astype(jnp.float32)
  ws = jax.lax.stop_gradient(w)
  _, vecs = jnp.linalg.eigh(ws @ ws.T)
  u = vecs[:, -1]  # eigh sorts ascending: the last column is the top left-singular vector.
  v = ws.T @ u
  v = v / (jnp.linalg.norm(v) + eps)
  sigma = u @ w @ v
  # sigma's sign follows the arbitrary sign of u: |sigma| is the singular value.
  return kernel / (jnp.abs(sigma) + eps).astype(kernel.dtype)


class SpectralConv1d(nn.Module):
  """Conv1d over tokens (B, N, C) -> (B, N, features) with a spectrally normalised kernel.

  kernel_size odd; padding k // 2, circular (StyleGAN-T's `padding_mode='circular'`). PyTorch's
  default Conv1d init (kaiming_uniform(a=sqrt(5)) kernel, U(+-1/sqrt(fan_in)) bias).
  """
  features: int
  kernel_size: int = 1
  out_axis: str | None = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    k = self.kernel_size
    if k % 2 != 1:
      raise ValueError(f"SpectralConv1d needs an odd kernel_size, got {k}.")
    kernel = self.param("kernel", nn.with_logical_partitioning(torch_conv_kernel, (None, "embed", self.out_axis)),
                        (k, cin, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(torch_conv_bias(cin * k), (self.out_axis,)),
                      (self.features,), jnp.float32)
    kernel = spectral_normalize(kernel)
    xf = x.astype(jnp.float32)
    if k > 1:
      p = k // 2
      xf = jnp.concatenate([xf[:, -p:], xf, xf[:, :p]], axis=1)  # circular padding along tokens.
    out = jax.lax.conv_general_dilated(xf, kernel, window_strides=(1,), padding="VALID",
                                       dimension_numbers=("NWC", "WIO", "NWC"))
    return out + bias


class BatchNormLocal(nn.Module):
  """Normalisation over virtual batches: (B, N, C); statistics per channel over (group samples, tokens).

  B must be a multiple of ceil(B / virtual_batch) groups (as the reference's `view` requires).
  """
  virtual_batch: int = VIRTUAL_BATCH
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    groups = math.ceil(b / self.virtual_batch)
    if b % groups:
      raise ValueError(f"BatchNormLocal: batch {b} does not split into {groups} equal virtual batches of "
                       f"<= {self.virtual_batch}; use a batch size that does.")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (c,), jnp.float32)
    xg = x.astype(jnp.float32).reshape(groups, b // groups, n, c)
    mean = jnp.mean(xg, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, n, c)
    return y * scale + bias


class DiscBlock(nn.Module):
  """SpectralConv1d(k) -> BatchNormLocal -> LeakyReLU(0.2): (B, N, C) -> (B, N, C)."""
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = SpectralConv1d(x.shape[-1], self.kernel_size, name="conv")(x)
    x = BatchNormLocal(name="norm")(x)
    return nn.leaky_relu(x, 0.2)


class DiscHead(nn.Module):
  """One LADD head: teacher features (B, N, h) -> per-token logits (B, N) (unconditional, c_dim 0)."""

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = DiscBlock(1, name="block_1")(features)
    x = (DiscBlock(9, name="block_9")(x) + x) / math.sqrt(2.0)
    return SpectralConv1d(1, 1, out_axis=None, name="cls")(x)[..., 0]


class LaddHeads(nn.Module):
  """One DiscHead per tapped teacher block: list of (B, N, h) -> (B, N * num_heads) logits.

  num_heads must equal the number of feature maps (len(head_block_ids)).
  """
  num_heads: int

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    if len(features) != self.num_heads:
      raise ValueError(f"LaddHeads has {self.num_heads} heads but got {len(features)} feature maps.")
    return jnp.concatenate([DiscHead(name=f"head_{i}")(f) for i, f in enumerate(features)], axis=1)
