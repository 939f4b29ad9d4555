"""TrigFlow (sCM) parameterisation and SANA-Sprint's training-free transform of a flow model into it.

TrigFlow (Lu & Song, sCM) with data scale sigma_d (SANA-Sprint: 0.5), time t in [0, pi/2]:
    x_t = cos(t) x0 + sin(t) sigma_d z,        z ~ N(0, I),
and the network F predicts the (normalised) velocity, so that the denoised estimate is
    x0_hat = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t).
Here x0 = sigma_d * latents: SanaSprintPipeline starts from randn * sigma_d and returns
denoised / sigma_d, so in the normalised state x_t / sigma_d = cos(t) latents + sin(t) z the flow
model's data are the latents it was trained on.

A flow model v(x_f, t_f) (x_f = (1 - t_f) latents + t_f z, v = z - latents; sanajax.diffusion.flow)
becomes a TrigFlow F with no training (SANA-Sprint Prop. 3.1; SanaMSCM.forward, and diffusers'
pipeline_sana_sprint.py, which does the same around the transformer call):
    t_f = sin t / (sin t + cos t)                               (same signal-to-noise ratio)
    x_f = (x_t / sigma_d) * sqrt(t_f^2 + (1 - t_f)^2)          (= (x_t / sigma_d) / (sin t + cos t))
    F   = ((1 - 2 t_f) x_f + (1 - 2 t_f + 2 t_f^2) v) / sqrt(t_f^2 + (1 - t_f)^2).
All functions are pure jnp, differentiable (sCM needs jax.jvp through them) and take t of shape
(B,) (or a scalar) broadcast over NHWC arrays.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5  # SANA-Sprint / diffusers SCMScheduler sigma_data.
T_MAX = 1.57080  # SCMScheduler max_timesteps (pi/2 rounded as the reference writes it).

FlowFn = Callable[..., jax.Array]


def _expand(t: jax.Array, ndim: int) -> jax.Array:
  """(B,) or scalar -> broadcastable against an (B, H, W, C) array."""
  t = jnp.asarray(t, jnp.float32)
  return t if t.ndim == 0 else t.reshape(t.shape + (1,) * (ndim - t.ndim))


def flow_time_from_trig(t: jax.Array) -> jax.Array:
  """t_f = sin t / (sin t + cos t): the flow time with TrigFlow time t's signal-to-noise ratio.

  Maps [0, pi/2] onto [0, 1] monotonically (0 -> 0, pi/4 -> 0.5, pi/2 -> 1).
  """
  t = jnp.asarray(t, jnp.float32)
  return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


def trig_time_from_flow(t_flow: jax.Array) -> jax.Array:
  """Inverse of flow_time_from_trig: t = arctan(t_f / (1 - t_f)) in [0, pi/2]."""
  t_flow = jnp.asarray(t_flow, jnp.float32)
  return jnp.arctan2(t_flow, 1.0 - t_flow)


def flow_input_scale(t_flow: jax.Array) -> jax.Array:
  """sqrt(t_f^2 + (1 - t_f)^2) = 1 / (sin t + cos t): normalised TrigFlow state -> flow state."""
  t_flow = jnp.asarray(t_flow, jnp.float32)
  return jnp.sqrt(jnp.square(t_flow) + jnp.square(1.0 - t_flow))


def add_noise(x0: jax.Array, z: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """x_t = cos(t) x0 + sin(t) sigma_d z. x0 (B, H, W, C) in TrigFlow units (sigma_d * latents)."""
  tt = _expand(t, x0.ndim)
  return jnp.cos(tt) * x0 + jnp.sin(tt) * sigma_data * z


def matched_flow_state(x_t: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA):
  """The flow-model input at the same noise level as TrigFlow's (x_t, t).

  Returns (x_f, t_f) with x_f = (x_t / sigma_d) sqrt(t_f^2 + (1 - t_f)^2), t_f = flow_time_from_trig(t):
  if x_t = add_noise(sigma_d * latents, z, t) then x_f = (1 - t_f) latents + t_f z exactly.
  """
  t_flow = flow_time_from_trig(t)
  return x_t / sigma_data * _expand(flow_input_scale(t_flow), x_t.ndim), t_flow


def trigflow_output(x_flow: jax.Array, t_flow: jax.Array, v: jax.Array) -> jax.Array:
  """F = ((1 - 2 t_f) x_f + (1 - 2 t_f + 2 t_f^2) v) / sqrt(t_f^2 + (1 - t_f)^2), in float32.

  x_flow: the flow model's input (B, H, W, C); t_flow: (B,); v: its velocity output.
  """
  tf = _expand(t_flow, x_flow.ndim)
  v = v.astype(jnp.float32)
  return ((1 - 2 * tf) * x_flow + (1 - 2 * tf + 2 * tf * tf) * v) / jnp.sqrt(tf * tf + (1 - tf) ** 2)


def flow_to_trigflow(flow_fn: FlowFn) -> FlowFn:
  """Wraps a flow-velocity model into a TrigFlow model F (SanaMSCM.forward).

  Args:
    flow_fn: `flow_fn(x_f, t_f, *args, **kwargs) -> v`, x_f (B, H, W, C), t_f (B,) flow time in
      [0, 1] (e.g. a bound SanaDiT.apply; a Sprint student's `guidance` goes in kwargs).
  Returns:
    `F_fn(x, t, *args, **kwargs) -> F` with x = x_t / sigma_d the normalised TrigFlow state
    (B, H, W, C) and t (B,) TrigFlow time in [0, pi/2]; F float32, x's shape.
  """

  def trig_fn(x: jax.Array, t: jax.Array, *args, **kwargs) -> jax.Array:
    x_flow, t_flow = matched_flow_state(x, t, 1.0)
    v = flow_fn(x_flow, t_flow, *args, **kwargs)
    return trigflow_output(x_flow, t_flow, v)

  return trig_fn


def denoised_from_F(x_t: jax.Array, t: jax.Array, F: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """x0_hat = cos(t) x_t - sin(t) sigma_d F; x_t and the result in TrigFlow units (sigma_d * latents)."""
  tt = _expand(t, x_t.ndim)
  return jnp.cos(tt) * x_t - jnp.sin(tt) * sigma_data * F


def flow_denoised(x_flow: jax.Array, t_flow: jax.Array, v: jax.Array) -> jax.Array:
  """The flow model's own clean estimate latents_hat = x_f - t_f v (x_f = (1 - t_f) x0 + t_f z, v = z - x0)."""
  return x_flow - _expand(t_flow, x_flow.ndim) * v


def trig_velocity_target(x0: jax.Array, z: jax.Array, t: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """The exact F for a known pair: (d x_t / dt) / sigma_d = cos(t) z - sin(t) x0 / sigma_d."""
  tt = _expand(t, x0.ndim)
  return jnp.cos(tt) * z - jnp.sin(tt) * x0 / sigma_data


def scm_time_grid(num_steps: int, max_t: float = T_MAX, intermediate_t: float | None = 1.3) -> list[float]:
  """SANA-Sprint's TrigFlow times, num_steps + 1 values ending at 0 (diffusers SCMScheduler.set_timesteps).

  2 steps: [max_t, intermediate_t, 0] (intermediate default 1.3); otherwise linspace(max_t, 0,
  num_steps + 1), e.g. 1 step [1.5708, 0], 4 steps [1.5708, 1.1781, 0.7854, 0.3927, 0].
  intermediate_t is only used for 2 steps (the Sana repo ignores it otherwise, as here).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if not 0.0 < max_t <= math.pi / 2 + 1e-4:
    raise ValueError(f"max_t must be in (0, pi/2], got {max_t}.")
  if num_steps == 2 and intermediate_t is not None:
    if not 0.0 < intermediate_t < max_t:
      raise ValueError(f"intermediate_t must be in (0, max_t={max_t}), got {intermediate_t}.")
    return [float(max_t), float(intermediate_t), 0.0]
  return [max_t - i * max_t / num_steps for i in range(num_steps)] + [0.0]
