"""Flow-model samplers: Flow-Euler and Flow-DPM-Solver++ (2M), with classifier-free guidance, and
the SANA-Sprint sCM sampler ("scm", 1-4 steps of a TrigFlow-wrapped student; see `scm`).

Both reproduce the diffusers schedulers that SANA's released pipelines use, step by step:
  * "flow_euler": `FlowMatchEulerDiscreteScheduler(shift=shift)`;
  * "flow_dpm": `DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True,
    prediction_type="flow_prediction")` with every other field at its default: algorithm_type
    "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final True,
    final_sigmas_type "zero", num_train_timesteps 1000. This is what diffusers'
    scripts/convert_sana_to_diffusers.py writes for `--scheduler_type flow-dpm_solver`, the
    default (SANA 1.0 uses flow_shift 3.0; 6.0 for 4K).

The two time grids differ (see `timestep_grid`), so each sampler uses its own.

Model function: `model_fn(x, t, context, context_mask) -> v` with x (B, H, W, C), t (B,) flow time
in [0, 1] (1 = noise), context (B, L, D) (or a pytree of (B, ...) arrays: SD3's {"context", "pooled"},
batched leaf by leaf for CFG), context_mask (B, L); v has x's shape. The model gets the
exact float time. (diffusers' SanaPipeline feeds the DPM model `int64(sigma * 1000)`, a truncated
time; the solver itself uses the exact sigma, as here.)

Every sampler is a pure function whose step loop is a `jax.lax.fori_loop`; jit it with the static
arguments bound, e.g. `jax.jit(functools.partial(flow_dpm_solver, model_fn, num_steps=20,
cfg_scale=4.5, shift=3.0))`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sanajax.diffusion import trigflow

ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' discretisation of [0, 1]; it enters both grids.
FLOW_SAMPLERS = ("flow_dpm", "flow_euler")  # flow-matching teachers
SAMPLERS = FLOW_SAMPLERS + ("scm",)  # scm: Sprint students (TrigFlow)


def _shift_np(sigmas, shift: float):
  """SD3 shift a s / (1 + (a - 1) s) in the dtype of `sigmas` (numpy)."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def _euler_grid(num_steps: int, shift: float) -> np.ndarray:
  """FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps).sigmas, (num_steps + 1,).

  diffusers builds its training table in float32 with the shift already applied, then spaces the
  inference times linearly between that table's ends and shifts again. Its smallest nonzero sigma is
  therefore shift(linspace(1, shift(1/1000), n)[-1]): shifted twice (0.00893 for shift 3, 10 steps).
  """
  s_min = np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS)  # float32, as the torch table.
  s_min = float(_shift_np(s_min, np.float32(shift)).astype(np.float32))
  s_max = float(_shift_np(np.float32(1.0), np.float32(shift)).astype(np.float32))
  timesteps = np.linspace(s_max * NUM_TRAIN_TIMESTEPS, s_min * NUM_TRAIN_TIMESTEPS, num_steps)
  sigmas = _shift_np(timesteps / NUM_TRAIN_TIMESTEPS, shift).astype(np.float32)
  return np.concatenate([sigmas, np.zeros(1, np.float32)])


def _dpm_grid(num_steps: int, shift: float) -> np.ndarray:
  """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift).sigmas, (num_steps + 1,).

  Unshifted sigmas are linspace(1 - 1/1000, 0, n + 1) (so the first is shift(0.999), not 1), the
  trailing 0 is dropped, and final_sigmas_type "zero" appends an exact 0.
  """
  alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
  sigmas = np.flip(_shift_np(1.0 - alphas, shift))[:-1]
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def timestep_grid(num_steps: int, shift: float, sampler: str = "flow_euler") -> np.ndarray:
  """The flow times a sampler visits, (num_steps + 1,) float32 numpy, decreasing to exactly 0.

  Args:
    num_steps: number of model evaluations (a Python int; the grid is a compile-time constant).
    shift: SD3 time shift (SANA: 3.0).
    sampler: "flow_euler" (starts at 1.0) or "flow_dpm" (starts at shift(0.999)); each equals the
      `sigmas` of the matching diffusers scheduler after `set_timesteps(num_steps)`.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if sampler == "flow_euler":
    return _euler_grid(num_steps, shift)
  if sampler == "flow_dpm":
    return _dpm_grid(num_steps, shift)
  raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")


def _cfg_is_off(cfg_scale) -> bool:
  """True when guidance is statically 1.0 (a Python number), so the uncond half can be skipped."""
  return isinstance(cfg_scale, (int, float, np.integer, np.floating)) and float(cfg_scale) == 1.0


def _concat_cond_uncond(context, mask, null_context, null_mask):
  """Stacks [cond; uncond] along batch; the null context may have batch 1 (SANA's null embedding).

  context may be a pytree of (B, ...) arrays (SD3's {"context", "pooled"}); each leaf is stacked."""
  both_context = jax.tree.map(lambda c, n: jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)], axis=0),
                              context, null_context)
  if mask is None:
    return both_context, None
  null_mask = jnp.ones_like(mask) if null_mask is None else jnp.broadcast_to(null_mask, mask.shape)
  return both_context, jnp.concatenate([mask, null_mask.astype(mask.dtype)], axis=0)


def as_cfg_interval(interval) -> tuple[float, float] | None:
  """A guidance interval (any (lo, hi) pair, e.g. a config's list) as a tuple of Python floats,
  hashable as a static jit argument; None stays None (guidance at every step)."""
  return None if interval is None else (float(interval[0]), float(interval[1]))


def guidance_interval_is_full(cfg_interval) -> bool:
  """True for None or an interval covering all of [0, 1]: plain CFG at every step."""
  return cfg_interval is None or (float(cfg_interval[0]) <= 0.0 and float(cfg_interval[1]) >= 1.0)


def guided_velocity(model_fn: ModelFn, x: jax.Array, t: jax.Array, context: jax.Array, mask: jax.Array | None,
                    null_context: jax.Array | None, null_mask: jax.Array | None, cfg_scale,
                    cfg_interval: tuple[float, float] | None = None) -> jax.Array:
  """Classifier-free guided velocity v = v_u + s (v_c - v_u), with ONE model call.

  Args:
    model_fn: see the module docstring.
    x: (B, H, W, C) current latents; t: (B,) flow time.
    context, mask: (B, L, D), (B, L) conditional text features and their mask.
    null_context, null_mask: (B or 1, L, D), (B or 1, L) the empty-caption features.
    cfg_scale: s, a scalar or per row (B, 1, 1, 1). A Python 1.0 runs the conditional batch only
      (B rows instead of 2B); a traced value always runs both halves.
    cfg_interval: (lo, hi) flow times; guidance applies only to rows with lo <= t <= hi, the others
      get the conditional velocity (s = 1): "guidance in a limited interval" (Kynkaanniemi et al.
      2024), SANA's `interval_guidance` (NVlabs/Sana diffusion/model/dpm_solver.py model_wrapper,
      exposed by scripts/inference_geneval.py for flow_dpm-solver; default [0, 1]). SANA tests
      lo < t < hi; no time of the flow_dpm grid lies on 0 or 1, so the two agree there unless lo
      is a grid time. None (or an interval covering [0, 1]): every t.
  Returns:
    (B, H, W, C) guided velocity, float32.
  """
  if _cfg_is_off(cfg_scale):
    return model_fn(x, t, context, mask).astype(jnp.float32)
  both_context, both_mask = _concat_cond_uncond(context, mask, null_context, null_mask)
  v = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both_context, both_mask)
  v_cond, v_uncond = jnp.split(v.astype(jnp.float32), 2, axis=0)
  if not guidance_interval_is_full(cfg_interval):
    inside = ((t >= cfg_interval[0]) & (t <= cfg_interval[1])).reshape(-1, *([1] * (v_cond.ndim - 1)))
    cfg_scale = jnp.where(inside, jnp.asarray(cfg_scale, jnp.float32), 1.0)  # scalar or (B, 1, 1, 1)
  return v_uncond + cfg_scale * (v_cond - v_uncond)


def guidance_segments(sigmas: np.ndarray, num_steps: int, cfg_scale,
                      cfg_interval: tuple[float, float] | None) -> list[tuple[int, int, bool]]:
  """The sampler's steps as (start, stop, guided) runs: a step runs the doubled CFG batch only when it
  is guided, i.e. cfg is on and its model time sigma_i lies in [lo, hi] (the test of guided_velocity,
  decided here statically from the grid). The grid is monotone, so the guided steps are one run;
  the others evaluate the conditional batch alone (B rows instead of 2B, same velocity since s = 1)."""
  if _cfg_is_off(cfg_scale):
    return [(0, num_steps, False)]
  if guidance_interval_is_full(cfg_interval):
    return [(0, num_steps, True)]
  lo, hi = np.float32(cfg_interval[0]), np.float32(cfg_interval[1])  # float32, as guided_velocity compares
  inside = [bool(lo <= np.float32(sigmas[i]) <= hi) for i in range(num_steps)]
  runs: list[tuple[int, int, bool]] = []
  for i, g in enumerate(inside):
    if runs and runs[-1][2] == g:
      runs[-1] = (runs[-1][0], i + 1, g)
    else:
      runs.append((i, i + 1, g))
  return runs


def _velocity_fn(model_fn, context, mask, null_context, null_mask, cfg_scale, cfg_interval=None):
  """Closes over the text inputs: (x (B,H,W,C) float32, sigma scalar) -> guided v float32."""

  def velocity(x, sigma):
    t = jnp.full((x.shape[0],), sigma, jnp.float32)
    return guided_velocity(model_fn, x, t, context, mask, null_context, null_mask, cfg_scale, cfg_interval)

  return velocity


def flow_euler(model_fn: ModelFn, noise: jax.Array, context: jax.Array, mask: jax.Array | None,
               null_context: jax.Array | None = None, null_mask: jax.Array | None = None, *,
               num_steps: int, cfg_scale=1.0, shift: float = 1.0,
               cfg_interval: tuple[float, float] | None = None) -> jax.Array:
  """Flow-Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i) on the Euler grid.

  Args:
    noise: (B, H, W, C) standard normal, the state at t = 1.
    context, mask, null_context, null_mask, cfg_scale, cfg_interval: see `guided_velocity`.
    num_steps, shift: static; see `timestep_grid`.
  Returns:
    x0 latents, (B, H, W, C) float32.
  """
  sigmas_np = timestep_grid(num_steps, shift, "flow_euler")
  sigmas = jnp.asarray(sigmas_np)
  x = noise.astype(jnp.float32)
  for start, stop, guided in guidance_segments(sigmas_np, num_steps, cfg_scale, cfg_interval):
    velocity = _velocity_fn(model_fn, context, mask, null_context, null_mask, *((cfg_scale, cfg_interval) if guided
                                                                                else (1.0, None)))

    def step(i, x, velocity=velocity):
      dt = sigmas[i + 1] - sigmas[i]  # negative: time runs from noise to data.
      return x + dt * velocity(x, sigmas[i])

    x = jax.lax.fori_loop(start, stop, step, x)
  return x


def _dpm_coefficients(sigmas: np.ndarray) -> np.ndarray:
  """Per-step weights (c_x, c_0, c_1), (n, 3) float32, of x_next = c_x x + c_0 D_i + c_1 D_{i-1}.

  D_i = x - sigma_i v_i is the data prediction at step i. On flow sigmas alpha = 1 - sigma and
  lambda = log(alpha / sigma); with h = lambda_next - lambda_i and A = alpha_next (1 - e^-h),
  DPM-Solver++ gives
    1st order (step 0, and the last step as lower_order_final / final sigma 0 force):
      x_next = (sigma_next / sigma_i) x + A D_i;
    2nd order multistep, midpoint (every other step), r = h_{i-1} / h:
      x_next = (sigma_next / sigma_i) x + A (D_i + (D_i - D_{i-1}) / (2 r)).
  The last step lands on sigma = 0 where lambda = inf; its limit x_next = D_i is written exactly.
  Computed in float64 from diffusers' float32 sigmas.
  """
  s = sigmas.astype(np.float64)
  n = len(s) - 1
  coef = np.zeros((n, 3), np.float64)
  lam = np.log1p(-s[:-1]) - np.log(s[:-1])  # finite: every sigma before the last is in (0, 1).
  for i in range(n):
    if i == n - 1:
      coef[i] = (0.0, 1.0, 0.0)
      continue
    lam_next = np.log1p(-s[i + 1]) - np.log(s[i + 1])
    h = lam_next - lam[i]
    a = (1 - s[i + 1]) * -np.expm1(-h)
    if i == 0:
      coef[i] = (s[i + 1] / s[i], a, 0.0)
    else:
      half_inv_r = 0.5 * h / (lam[i] - lam[i - 1])
      coef[i] = (s[i + 1] / s[i], a * (1 + half_inv_r), -a * half_inv_r)
  return coef.astype(np.float32)


def flow_dpm_solver(model_fn: ModelFn, noise: jax.Array, context: jax.Array, mask: jax.Array | None,
                    null_context: jax.Array | None = None, null_mask: jax.Array | None = None, *,
                    num_steps: int, cfg_scale=1.0, shift: float = 1.0,
                    cfg_interval: tuple[float, float] | None = None) -> jax.Array:
  """Flow-DPM-Solver: multistep 2nd-order DPM-Solver++ (data prediction) on the DPM flow grid.

  Matches diffusers' DPMSolverMultistepScheduler as configured for SANA (module docstring); see
  `_dpm_coefficients` for the update. Arguments and result as `flow_euler`.
  """
  sigmas_np = timestep_grid(num_steps, shift, "flow_dpm")
  sigmas = jnp.asarray(sigmas_np)
  coef = jnp.asarray(_dpm_coefficients(sigmas_np))
  carry = (noise.astype(jnp.float32), jnp.zeros(noise.shape, jnp.float32))
  for start, stop, guided in guidance_segments(sigmas_np, num_steps, cfg_scale, cfg_interval):
    velocity = _velocity_fn(model_fn, context, mask, null_context, null_mask, *((cfg_scale, cfg_interval) if guided
                                                                                else (1.0, None)))

    def step(i, carry, velocity=velocity):
      x, d_prev = carry
      d = x - sigmas[i] * velocity(x, sigmas[i])  # data (x0) prediction.
      x_next = coef[i, 0] * x + coef[i, 1] * d + coef[i, 2] * d_prev
      return x_next, d

    carry = jax.lax.fori_loop(start, stop, step, carry)
  return carry[0]


def scm(model_fn: ModelFn, noise: jax.Array, context: jax.Array, mask: jax.Array | None, *, num_steps: int,
        key: jax.Array | None = None, step_noise: jax.Array | None = None,
        sigma_data: float = trigflow.SIGMA_DATA, max_t: float = trigflow.T_MAX,
        intermediate_t: float | None = 1.3) -> jax.Array:
  """SANA-Sprint's sCM sampler (diffusers SanaSprintPipeline + SCMScheduler, step by step).

  With times s_0 > s_1 > ... > s_n = 0 from `trigflow.scm_time_grid` (1 step [pi/2, 0], 2 steps
  [pi/2, 1.3, 0], 4 steps linspace(pi/2, 0, 5)) and x = sigma_d * noise:
    F    = TrigFlow(model_fn)(x / sigma_d, s_i)          (trigflow.flow_to_trigflow)
    x0_i = cos(s_i) x - sin(s_i) sigma_d F
    x    = cos(s_{i+1}) x0_i + sin(s_{i+1}) sigma_d eps_i  (fresh noise; x = x0_i at the last step)
  and returns x0_{n-1} / sigma_d, the latents (SanaSprintPipeline's output_type="latent").

  Args:
    model_fn: the student's FLOW velocity, `model_fn(x_f, t_f, context, mask) -> v` (module
      docstring); a guidance-embedding student has its CFG scale bound in (no CFG batch doubling:
      the student was distilled from the guided teacher).
    noise: (B, H, W, C) standard normal.
    context, mask: (B, L, D), (B, L) text features.
    num_steps: static, >= 1 (one model call each).
    key: draws eps_i (i < num_steps - 1) when step_noise is None; needed when num_steps > 1.
    step_noise: optional (num_steps - 1, B, H, W, C) standard normal eps_i (to replay diffusers' draws).
    sigma_data, max_t, intermediate_t: SCMScheduler's sigma_data 0.5, max_timesteps 1.5708,
      intermediate_timesteps 1.3 (2 steps only).
  Returns:
    (B, H, W, C) float32 latents.
  """
  times = trigflow.scm_time_grid(num_steps, max_t, intermediate_t)
  if num_steps > 1 and step_noise is None:
    if key is None:
      raise ValueError(f"scm with num_steps={num_steps} re-noises between steps: pass key= or step_noise=.")
    step_noise = jax.random.normal(key, (num_steps - 1, *noise.shape), jnp.float32)
  if step_noise is not None and step_noise.shape[0] < num_steps - 1:
    raise ValueError(f"step_noise needs {num_steps - 1} draws of {noise.shape}, got {step_noise.shape}.")
  trig_fn = trigflow.flow_to_trigflow(model_fn)
  x = noise.astype(jnp.float32) * sigma_data
  x0 = x
  for i in range(num_steps):  # 1-4 steps: unrolled; each step is one model call.
    s = jnp.full((x.shape[0],), times[i], jnp.float32)
    pred = sigma_data * trig_fn(x / sigma_data, s, context, mask)
    eps = step_noise[i] if i < num_steps - 1 else jnp.zeros_like(x)  # sin(0) = 0: the last step adds none.
    x, x0 = scm_step(pred, times[i], times[i + 1], x, eps, sigma_data)
  return x0 / sigma_data


def scm_step(model_output: jax.Array, s: float, t: float, sample: jax.Array, eps: jax.Array,
             sigma_data: float = trigflow.SIGMA_DATA) -> tuple[jax.Array, jax.Array]:
  """One SCMScheduler.step: from time s to t (< s) given pred = sigma_d * F(sample / sigma_d, s).

  x0 = cos(s) sample - sin(s) pred; next = cos(t) x0 + sin(t) sigma_d eps. Returns (next, x0),
  as diffusers' `step(..., return_dict=False)` (eps is its `randn_tensor` draw).
  """
  s, t = jnp.float32(s), jnp.float32(t)
  x0 = jnp.cos(s) * sample - jnp.sin(s) * model_output
  return jnp.cos(t) * x0 + jnp.sin(t) * (eps.astype(jnp.float32) * sigma_data), x0


_SAMPLER_FNS = {"flow_dpm": flow_dpm_solver, "flow_euler": flow_euler}


def sample(model_fn: ModelFn, noise: jax.Array, context: jax.Array, mask: jax.Array | None,
           null_context: jax.Array | None = None, null_mask: jax.Array | None = None, *,
           sampler: str = "flow_dpm", num_steps: int = 20, cfg_scale=4.5, shift: float = 3.0,
           cfg_interval: tuple[float, float] | None = None) -> jax.Array:
  """Runs `sampler` ("flow_dpm" | "flow_euler") from `noise`; returns x0 latents (B, H, W, C).

  Defaults are SANA's: Flow-DPM-Solver, 20 steps, CFG 4.5 at every step, flow shift 3.0.
  cfg_interval: optional (lo, hi) flow times outside which guidance is off (see `guided_velocity`).
  """
  if sampler == "scm":
    raise ValueError("sampler='scm' runs a Sprint student: call samplers.scm (its CFG scale is the model's guidance "
                     "input, bound into model_fn, and it needs a key for re-noising).")
  if sampler not in _SAMPLER_FNS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS} (config field sample.sampler).")
  if not _cfg_is_off(cfg_scale) and null_context is None:
    raise ValueError(f"cfg_scale={cfg_scale} needs null_context (the empty-caption features); pass it or use 1.0.")
  return _SAMPLER_FNS[sampler](model_fn, noise, context, mask, null_context, null_mask,
                               num_steps=num_steps, cfg_scale=cfg_scale, shift=shift, cfg_interval=cfg_interval)
