"""Depthwise 2D convolution ('same', stride 1) as shifted multiply-adds: the plain op under the DiT's
Mix-FFN conv and the AE's depthwise convs, and the per-shard op of sanajax.parallel.sequence.depthwise_conv2d.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def depthwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 'same' conv, stride 1, odd k: x (B, H, W, C), kernel (k, k, 1, C) -> (B, H, W, C).

  Written as k*k shifted multiply-adds over one zero-padded copy instead of a grouped
  `conv_general_dilated`: equal in value and gradient (tested), and XLA's CPU backend
  differentiates grouped convs ~10x slower (measured: 1.16 s vs 0.12 s for the gradient at
  (64, 8, 8, 640) on 2 cores); on GPU/TPU the shifted form fuses into one elementwise kernel.
  (Shifting by slice + concatenate, k column shifts then k row shifts of per-row sums, is ~14%
  faster still for the tiny DiT's gradient on CPU, but its other rounding moved the default AE
  under its 28 dB bar; README "Results", 2026-12-03.)
  """
  k = kernel.shape[0]
  if k % 2 != 1 or kernel.shape[1] != k:
    raise ValueError(f"depthwise_conv2d needs an odd square kernel, got {kernel.shape}.")
  h, w = x.shape[1], x.shape[2]
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out
