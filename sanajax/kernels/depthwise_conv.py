"""Depthwise 2D convolution ('same', stride 1): the plain op under the DiT's Mix-FFN conv and the AE's
depthwise convs, and the per-shard op of sanajax.parallel.sequence.depthwise_conv2d.

Two forms, equal in value and gradient up to float32 rounding (tested against a grouped conv):
- shifted multiply-adds over one zero-padded copy (any grid);
- on small grids (H W <= DENSE_MAX_TOKENS), one (H W, H W) matrix per channel, the kernel's taps scattered
  onto the grid's neighbour pattern, applied as a batched matmul: its gradient is two more matmuls, where
  the shifted form's gradient pads the cotangent once per tap. The tiny DiT's 4x4-token Mix-FFN conv
  (32, 4, 4, 480) runs forward + gradient in 2.6 ms against 13.4 ms shifted on 2 CPU cores
  (docs/results.md#the-faster-step).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Grids up to this many tokens (8 x 8) take the dense form: its (H W)^2 per-channel cost is ~3.5x the shifted
# form's 9 H W multiply-adds at 8 x 8 but runs as matmuls; above, the shifted form (2 CPU cores, measured).
DENSE_MAX_TOKENS = 64


@functools.lru_cache(maxsize=None)
def _neighbour_taps(h: int, w: int, k: int) -> np.ndarray:
  """(k, k, h w, h w) 0/1: [i, j, p, q] = 1 where grid token q is tap (i, j) of output token p's 'same' window."""
  pad = k // 2
  taps = np.zeros((k, k, h * w, h * w), np.float32)
  for i in range(k):
    for j in range(k):
      for y in range(h):
        for x in range(w):
          yy, xx = y + i - pad, x + j - pad
          if 0 <= yy < h and 0 <= xx < w:
            taps[i, j, y * w + x, yy * w + xx] = 1.0
  return taps


def depthwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 'same' conv, stride 1, odd k: x (B, H, W, C), kernel (k, k, 1, C) -> (B, H, W, C).

  Small grids take the dense form (module docstring). Otherwise k*k shifted multiply-adds over one
  zero-padded copy instead of a grouped `conv_general_dilated`: equal in value and gradient (tested), and XLA's CPU backend
  differentiates grouped convs ~10x slower (measured: 1.16 s vs 0.12 s for the gradient at
  (64, 8, 8, 640) on 2 cores); on GPU/TPU the shifted form fuses into one elementwise kernel.
  (Shifting by slice + concatenate, k column shifts then k row shifts of per-row sums, is ~14%
  faster still for the tiny DiT's gradient on CPU, but its other rounding moved the default AE
  under its 28 dB bar; README "Results", 2026-12-03.)
  """
  k = kernel.shape[0]
  if k % 2 != 1 or kernel.shape[1] != k:
    raise ValueError(f"depthwise_conv2d needs an odd square kernel, got {kernel.shape}.")
  b, h, w, c = x.shape
  if h * w <= DENSE_MAX_TOKENS:
    taps = jnp.asarray(_neighbour_taps(h, w, k), x.dtype)
    exact = jax.lax.Precision.HIGHEST  # float32 stays float32 on TPU / GPU (no bf16 / TF32 passes) as the shifted form
    per_channel = jnp.einsum("ijpq,ijc->cpq", taps, kernel[:, :, 0, :], precision=exact)  # (C, hw, hw)
    return jnp.einsum("cpq,bqc->bpc", per_channel, x.reshape(b, h * w, c), precision=exact).reshape(b, h, w, c)
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out
