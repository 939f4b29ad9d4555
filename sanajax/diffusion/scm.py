"""SANA-Sprint distillation losses as pure functions: sCM (continuous-time consistency, tangent by
`jax.jvp`) and LADD (hinge loss on discriminator heads over frozen-teacher features).

TrigFlow conventions as sanajax.diffusion.trigflow (which holds the flow <-> TrigFlow transform,
`add_noise` and `denoised_from_F`): trig time t in [0, pi/2] (pi/2 = noise), x0 = sigma_d * latents,
x_t = cos t x0 + sin t sigma_d z, the model F(x_t / sigma_d, t) with dx_t/dt = sigma_d F. Arrays
are NHWC; t has shape (B,) and broadcasts over the other axes. Reference: NVlabs/Sana
train_scripts/train_scm_ladd.py.

sCM training signal (SANA-Sprint eq. (7) and the reference code): with the teacher's (CFG-guided)
probability-flow velocity dx_t/dt, the student's stop-gradient prediction F^- and its total time
derivative along the PF-ODE, obtained in ONE forward-mode pass

    cos t sin t dF^-/dt = jvp(F^-, (x_t / sigma_d, t), (cos t sin t dx_t/dt / sigma_d, cos t sin t)),

the tangent is

    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt),

with the warm-up r = min(1, step / warmup_steps), normalised per sample as g / (||g|| + c), and the
loss is mean[ (1 / (sigma_d tan t)) / e^u(t) * (F_theta - F^- - g)^2 + u(t) ] with the adaptive
log-variance u(t). Its gradient in theta equals the sCM gradient (the F^- and g terms are constants).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# The reference's largest training / sampling time: pi/2 rounded as in SCMScheduler (1.57080).
LARGEST_TIME = 1.5708


def _expand(t: jax.Array, ndim: int) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) with `ndim` axes."""
  return jnp.asarray(t).reshape(jnp.shape(t) + (1,) * (ndim - jnp.ndim(t)))


def sample_trigflow_time(key: jax.Array, batch: int, *, mean: float, std: float,
                         sigma_data: float = 0.5) -> jax.Array:
  """TrigFlow training times t = atan(exp(n) / sigma_d), n ~ N(mean, std^2); (batch,) float32 in (0, pi/2).

  exp(n) is the noise-to-signal ratio sigma of EDM (log-normal, as EDM's P_mean / P_std), mapped to
  the trig angle: tan t = sigma / sigma_d. SANA-Sprint: generator (0.2, 1.6), discriminator (-0.6, 1.0)
  (the reference's `logit_normal_trigflow`).
  """
  n = mean + std * jax.random.normal(key, (batch,), jnp.float32)
  return jnp.arctan(jnp.exp(n) / sigma_data)


def largest_time_mix(key: jax.Array, t: jax.Array, prob: float, largest: float = LARGEST_TIME) -> jax.Array:
  """Replaces each time by `largest` with probability `prob` (SANA-Sprint `train_largest_timestep`:
  half of the adversarial generator samples start from pure noise, the one-step case)."""
  return jnp.where(jax.random.uniform(key, t.shape) < prob, jnp.asarray(largest, t.dtype), t)


def tangent_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """r = min(1, step / warmup_steps) (float32 scalar); warmup_steps <= 0 gives 1."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))


def student_tangent(F_fn: Callable[[jax.Array, jax.Array], jax.Array], x_t: jax.Array, t: jax.Array,
                    dxt_dt: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array]:
  """(F^-, cos t sin t dF^-/dt) in one forward-mode pass (`jax.jvp`), no finite differences.

  Args:
    F_fn: (x_scaled (B, H, W, C), t (B,)) -> F (B, H, W, C): the student's TrigFlow prediction with
      everything else (parameters, text, guidance) bound; called at x_t / sigma_d.
    x_t: (B, H, W, C) noisy sample in sigma_d units; t: (B,) trig time.
    dxt_dt: (B, H, W, C) the PF-ODE velocity at (x_t, t) (the teacher's sigma_d F_teacher).
  Returns:
    F^- = F_fn(x_t / sigma_d, t) and its directional derivative along
    (cos t sin t dx_t/dt / sigma_d, cos t sin t), i.e. cos t sin t times the total derivative
    dF^-/dt along the ODE, both float32 (B, H, W, C). The cos t sin t factor keeps the tangent
    finite near t = pi/2, as in the reference.
  """
  cs = jnp.cos(t) * jnp.sin(t)
  tangent_x = _expand(cs, x_t.ndim) * dxt_dt / sigma_data
  F, dF = jax.jvp(F_fn, (x_t / sigma_data, t), (tangent_x.astype(x_t.dtype), cs.astype(t.dtype)))
  return F.astype(jnp.float32), dF.astype(jnp.float32)


def scm_tangent(F_minus: jax.Array, dF_dt: jax.Array, dxt_dt: jax.Array, x_t: jax.Array, t: jax.Array,
                r: jax.Array, sigma_data: float, norm_constant: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """The normalised sCM tangent g (B, H, W, C) and the per-sample norm ||g|| (B,) before normalising.

  g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF_dt), where dF_dt is what
  `student_tangent` returns (already times cos t sin t); then g / (||g||_2 + norm_constant) with the
  L2 norm over each sample's H, W, C (the reference's `vector_norm(dim=(1, 2, 3))`, constant 0.1).
  """
  tt = _expand(t, x_t.ndim).astype(jnp.float32)
  cos, sin = jnp.cos(tt), jnp.sin(tt)
  g = -cos * cos * (sigma_data * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_data * dF_dt)
  g_norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
  return g / (_expand(g_norm, g.ndim) + norm_constant), g_norm


def scm_loss(F: jax.Array, F_minus: jax.Array, g: jax.Array, t: jax.Array, logvar: jax.Array,
             sigma_data: float) -> tuple[jax.Array, dict]:
  """sCM loss with adaptive weighting, a float32 scalar, and diagnostics.

  loss = mean[ w(t) / e^u * (F - F^- - g)^2 + u ], w(t) = 1 / (sigma_d tan t); F: (B, H, W, C) with
  gradient, F^- and g constants (stop-gradient here), u = logvar (B,). The mean runs over every
  element, as the reference's `loss.mean()`.
  Returns (loss, {"scm_loss_no_logvar": mean w (F - F^- - g)^2, "scm_l2": mean (F - F^- - g)^2}).
  """
  F_minus, g = jax.lax.stop_gradient(F_minus), jax.lax.stop_gradient(g)
  tt = _expand(t, F.ndim).astype(jnp.float32)
  weight = 1.0 / (sigma_data * jnp.tan(tt))
  u = _expand(logvar.astype(jnp.float32), F.ndim)
  l2 = jnp.square(F.astype(jnp.float32) - F_minus - g)
  loss = jnp.mean(weight / jnp.exp(u) * l2 + u)
  return loss, {"scm_loss_no_logvar": jnp.mean(weight * l2), "scm_l2": jnp.mean(l2)}


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, dict]:
  """LADD / StyleGAN-T hinge loss for the heads: 0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))).

  Zero once real logits are >= 1 and fake logits <= -1. Returns (loss, {"d_loss_real", "d_loss_fake"}).
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake), {"d_loss_real": loss_real, "d_loss_fake": loss_fake}


def adversarial_generator_loss(fake_logits: jax.Array) -> jax.Array:
  """The student's hinge-GAN loss -mean D(fake): lower when the heads score its samples as real."""
  return -jnp.mean(fake_logits.astype(jnp.float32))


def cfg_scale_choices(key: jax.Array, batch: int, choices) -> jax.Array:
  """(batch,) float32 teacher CFG scales drawn uniformly from `choices` (SANA-Sprint: {4, 4.5, 5})."""
  values = jnp.asarray([float(c) for c in choices], jnp.float32)
  return values[jax.random.randint(key, (batch,), 0, values.shape[0])]


__all__ = ["LARGEST_TIME", "sample_trigflow_time", "largest_time_mix", "tangent_warmup",
           "student_tangent", "scm_tangent", "scm_loss", "hinge_discriminator_loss",
           "adversarial_generator_loss", "cfg_scale_choices"]
