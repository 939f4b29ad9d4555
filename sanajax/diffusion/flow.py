"""Rectified flow (SANA / SD3): interpolants, training-time samplers, shift, loss.

Conventions (shared by the whole package):
  * flow time t in [0, 1]; t = 0 is data, t = 1 is pure noise;
  * x_t = (1 - t) * x0 + t * eps, so the velocity dx_t/dt is v = eps - x0;
  * arrays are NHWC; t has shape (B,) and broadcasts over the other axes;
  * randomness comes from explicit `jax.random` keys.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Training times are kept this far inside (0, 1): at t = 0 or 1 one of the two interpolant terms
# vanishes, and downstream transforms (logit, TrigFlow's atan, log-SNR) blow up there.
T_EPS = 1e-5

WEIGHTINGS = ("logit_normal", "mode", "cosmap", "uniform")


def _expand_time(t: jax.Array, ndim: int) -> jax.Array:
  """(B,) or scalar t -> shape (B, 1, ..., 1) with `ndim` axes, to broadcast over a sample."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t eps.

  Args:
    x0: clean latents, (B, H, W, C).
    eps: standard normal noise, same shape as x0.
    t: flow time, (B,) (or a scalar), in [0, 1].
  Returns:
    x_t, same shape and dtype as x0.
  """
  tt = _expand_time(t, x0.ndim).astype(x0.dtype)
  return (1 - tt) * x0 + tt * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The rectified-flow regression target v = d x_t / dt = eps - x0 (same shape as x0)."""
  return eps - x0


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """SD3 time shift t' = a t / (1 + (a - 1) t) with a = `shift`.

  Monotone on [0, 1], fixes 0 and 1, and maps t = 0.5 to a / (1 + a); a > 1 moves times towards
  noise (t = 1), which high resolutions need (their images stay recognisable under more noise).
  In terms of signal-to-noise ratio it divides SNR(t) = ((1 - t) / t)^2 by a^2.
  """
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_pixels: float, base_pixels: float) -> float:
  """SD3's resolution-dependent shift a = sqrt(m / n).

  Args:
    num_pixels: m, pixels (or latent tokens) of the resolution being trained / sampled.
    base_pixels: n, pixels of the resolution the schedule was tuned at.
  Returns:
    a >= 1 when m >= n: more pixels -> larger shift (more time near noise). SD3 derives it by
    matching the noise level at which an m-pixel image is as uncertain as an n-pixel one; e.g.
    1024^2 against 256^2 gives 4 (SD3 then settled on 3.0, as SANA's flow_shift does).
  """
  if num_pixels <= 0 or base_pixels <= 0:
    raise ValueError(f"Pixel counts must be positive, got num_pixels={num_pixels}, base_pixels={base_pixels}.")
  return math.sqrt(num_pixels / base_pixels)


def _mode_time(u: jax.Array, scale: float) -> jax.Array:
  """SD3 "mode" sampling f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u); u ~ U(0, 1).

  The density peaks at t = 0.5 for s > 0; f is monotone (a valid density) for -1 <= s <= 2/(pi-2).
  """
  return 1 - u - scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)


def _cosmap_time(u: jax.Array) -> jax.Array:
  """SD3 "CosMap" f(u) = 1 - 1 / (tan(pi u / 2) + 1): the log-SNR of a cosine schedule."""
  return 1 - 1 / (jnp.tan(jnp.pi * u / 2) + 1)


def sample_time(key: jax.Array, batch: int, *, weighting: str = "logit_normal", logit_mean: float = 0.,
                logit_std: float = 1., mode_scale: float = 1.29, shift: float = 1.0, alt_shift: float = 1.0,
                alt_shift_fraction: float = 0.0) -> jax.Array:
  """Draws training times t, (batch,) float32, strictly inside (0, 1).

  weighting:
    "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SANA and SD3's default);
    "mode": SD3's mode sampling with `mode_scale` (1.29 in SD3);
    "cosmap": SD3's CosMap;
    "uniform": t ~ U(0, 1).
  The draw is then shifted by `shift_time(., shift)` (1.0 leaves it unchanged) and clipped to
  [T_EPS, 1 - T_EPS]. With alt_shift_fraction p > 0, each time is instead shifted by `alt_shift`
  with probability p: a mixture of two shifted densities, e.g. shift 3 for layout (high noise)
  and 1 for detail (mid noise). p = 0 draws exactly what it drew without these arguments.
  """
  if not 0.0 <= alt_shift_fraction <= 1.0:
    raise ValueError(f"alt_shift_fraction must lie in [0, 1], got {alt_shift_fraction}.")
  if alt_shift_fraction > 0:
    key, k_mix = jax.random.split(key)
  if weighting == "logit_normal":
    n = logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32)
    t = jax.nn.sigmoid(n)
  elif weighting in ("mode", "cosmap", "uniform"):
    u = jax.random.uniform(key, (batch,), jnp.float32)
    if weighting == "mode":
      t = _mode_time(u, mode_scale)
    elif weighting == "cosmap":
      t = _cosmap_time(u)
    else:
      t = u
  else:
    raise ValueError(f"Unknown time weighting {weighting!r}; choose one of {WEIGHTINGS}.")
  shifted = shift_time(t, shift)
  if alt_shift_fraction > 0:
    use_alt = jax.random.bernoulli(k_mix, alt_shift_fraction, (batch,))
    shifted = jnp.where(use_alt, shift_time(t, alt_shift), shifted)
  return jnp.clip(shifted, T_EPS, 1 - T_EPS).astype(jnp.float32)


def shift_for_size(diffusion_config: Any, height: int, width: int, resolution: int) -> float:
  """The flow shift of a (height, width) px image (an aspect-ratio bucket, a sampled size): diffusion.flow_shift,
  times SD3's resolution_shift(height x width, resolution^2) when diffusion.resolution_shift is on (the
  shift was set for resolution^2 pixels; SANA's buckets keep about that area, so they move it by a few %,
  a sample at twice the side doubles it)."""
  shift = float(diffusion_config.get("flow_shift", 1.0))
  if diffusion_config.get("resolution_shift", False):
    shift *= resolution_shift(float(height) * float(width), float(resolution) ** 2)
  return shift


def sample_time_from_config(key: jax.Array, batch: int, diffusion_config: Any, shift: float | None = None) -> jax.Array:
  """`sample_time` with the fields of a config's `diffusion` section (see configs/tiny.py).

  Reads weighting, logit_mean, logit_std, mode_scale, flow_shift, alt_shift and alt_shift_fraction;
  missing fields fall back to the defaults of `sample_time` (flow_shift: 1.0). shift: replaces flow_shift
  (shift_for_size's per-bucket value).
  """
  c = diffusion_config
  return sample_time(key, batch, weighting=c.get("weighting", "logit_normal"),
                     logit_mean=float(c.get("logit_mean", 0.0)), logit_std=float(c.get("logit_std", 1.0)),
                     mode_scale=float(c.get("mode_scale", 1.29)),
                     shift=float(c.get("flow_shift", 1.0) if shift is None else shift),
                     alt_shift=float(c.get("alt_shift", 1.0)),
                     alt_shift_fraction=float(c.get("alt_shift_fraction", 0.0)))


def _expand_mask(mask: jax.Array, ndim: int) -> jax.Array:
  """Right-pads a mask with unit axes: (B,) -> (B, 1, 1, 1), (B, H, W) -> (B, H, W, 1)."""
  mask = jnp.asarray(mask, jnp.float32)
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def flow_matching_loss(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error between predicted and target velocity, a float32 scalar.

  Args:
    pred, target: (B, H, W, C) in any float dtype; the difference is taken in float32.
    mask: optional weights, (B,), (B, H, W) or (B, H, W, C) (right-padded with unit axes), e.g. 0
      for padded samples. The loss is sum(mask * err^2) / sum(mask broadcast to pred), i.e. the
      mean over the elements that count; an all-zero mask gives 0, not NaN.
  """
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if mask is None:
    return jnp.mean(err)
  weights = jnp.broadcast_to(_expand_mask(mask, err.ndim), err.shape)
  return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
