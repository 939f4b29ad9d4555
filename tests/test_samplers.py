"""Flow samplers against diffusers' schedulers (step by step), a Gaussian with a known flow, and CFG."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax.diffusion import samplers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, H, W, C, L, D = 2, 3, 3, 4, 5, 6


def _coefficients(seed=0):
  """Fixed random coefficients of a linear velocity field (float32 numpy)."""
  rng = np.random.default_rng(seed)
  return dict(w=(0.4 * rng.normal(size=(C, C))).astype(np.float32),
              c=rng.normal(size=(C,)).astype(np.float32),
              p=(0.3 * rng.normal(size=(D, C))).astype(np.float32))


def _linear_model(xp, coef):
  """v = (x @ w)(1 + t) + t c + pooled(context) @ p: nontrivial in x, t and the (masked) text.

  `xp` is numpy or jax.numpy, so the same field runs in the reference loop and in the sampler.
  """

  def model_fn(x, t, context, mask):
    t = t.reshape(-1, 1, 1, 1)
    pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # (B, D)
    text = (pooled @ coef["p"])[:, None, None, :]
    return (x @ coef["w"]) * (1 + t) + t * coef["c"] + text

  return model_fn


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(B, H, W, C)).astype(np.float32)
  context = rng.normal(size=(B, L, D)).astype(np.float32)
  mask = np.ones((B, L), np.float32)
  mask[1, 3:] = 0  # a padded caption: the masked tokens must not count.
  null_context = rng.normal(size=(1, L, D)).astype(np.float32)
  null_mask = np.ones((1, L), np.float32)
  return noise, context, mask, null_context, null_mask


def _make_scheduler(sampler, shift):
  if sampler == "flow_euler":
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  # As diffusers' scripts/convert_sana_to_diffusers.py builds SANA's scheduler.
  return diffusers.DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True,
                                               prediction_type="flow_prediction")


def _reference(sampler, num_steps, shift, cfg_scale, coef, noise, context, mask, null_context, null_mask):
  """diffusers' scheduler.step loop; returns (model inputs x per step, sigmas per step, final x)."""
  sched = _make_scheduler(sampler, shift)
  sched.set_timesteps(num_steps)
  model = _linear_model(np, coef)
  null_context = np.broadcast_to(null_context, context.shape)
  null_mask = np.broadcast_to(null_mask, mask.shape)
  x = torch.from_numpy(noise)
  xs, ts = [], []
  for i, timestep in enumerate(sched.timesteps):
    sigma = np.full((B,), sched.sigmas[i].item(), np.float32)
    xn = x.numpy()
    xs.append(xn.copy())
    ts.append(sigma[0])
    v_c = model(xn, sigma, context, mask)
    v_u = model(xn, sigma, null_context, null_mask)
    v = v_c if cfg_scale == 1.0 else v_u + np.float32(cfg_scale) * (v_c - v_u)
    x = sched.step(torch.from_numpy(v.astype(np.float32)), timestep, x).prev_sample
  return np.stack(xs), np.array(ts), x.numpy()


def _recording_model(coef, log):
  """The jnp linear model, also logging (x, t) of the conditional half at every call."""
  model = _linear_model(jnp, coef)

  def model_fn(x, t, context, mask):
    jax.debug.callback(lambda xx, tt: log.append((np.asarray(xx)[:B], np.asarray(tt)[:B])), x, t, ordered=True)
    return model(x, t, context, mask)

  return model_fn


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 20, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_timestep_grid_equals_diffusers(num_steps, shift):
  for sampler in samplers.FLOW_SAMPLERS:
    sched = _make_scheduler(sampler, shift)
    sched.set_timesteps(num_steps)
    grid = samplers.timestep_grid(num_steps, shift, sampler)
    assert grid.shape == (num_steps + 1,) and grid.dtype == np.float32
    np.testing.assert_array_equal(grid, sched.sigmas.numpy())
    assert grid[-1] == 0.0 and np.all(np.diff(grid) < 0)


def test_grids_differ_as_documented():
  euler = samplers.timestep_grid(10, 3.0, "flow_euler")
  dpm = samplers.timestep_grid(10, 3.0, "flow_dpm")
  assert euler[0] == 1.0 and dpm[0] == pytest.approx(3 * 0.999 / (1 + 2 * 0.999))
  assert not np.allclose(euler, dpm)
  with pytest.raises(ValueError, match="sampler"):
    samplers.timestep_grid(10, 3.0, "ddim")


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpm"])
@pytest.mark.parametrize("num_steps,shift,cfg_scale", [(10, 1.0, 1.0), (10, 3.0, 1.0), (20, 1.0, 1.0),
                                                        (20, 3.0, 4.5), (3, 3.0, 1.0)])
def test_sampler_matches_diffusers_step_by_step(sampler, num_steps, shift, cfg_scale):
  coef = _coefficients()
  inputs = _inputs()
  ref_xs, ref_ts, ref_final = _reference(sampler, num_steps, shift, cfg_scale, coef, *inputs)
  log = []
  run = jax.jit(functools.partial(samplers.sample, _recording_model(coef, log), sampler=sampler,
                                  num_steps=num_steps, cfg_scale=cfg_scale, shift=shift))
  final = jax.block_until_ready(run(*map(jnp.asarray, inputs)))
  jax.effects_barrier()
  assert final.shape == (B, H, W, C) and final.dtype == jnp.float32
  assert len(log) == num_steps
  for i, (x, t) in enumerate(log):
    np.testing.assert_array_equal(t, np.full((B,), ref_ts[i], np.float32))  # same times, exactly.
    assert _rel_err(x, ref_xs[i]) < 1e-5, f"step {i}"
  assert _rel_err(final, ref_final) < 1e-5
  np.testing.assert_allclose(final, ref_final, rtol=1e-5, atol=1e-5 * np.abs(ref_final).max())


def _gaussian_velocity(mu, s):
  """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mu, s^2) per element.

  With a = 1 - t: x_t ~ N(a mu, a^2 s^2 + t^2) and v = (t - a s^2) / (a^2 s^2 + t^2) (x - a mu) - mu.
  Its flow carries noise eps at t = 1 to exactly mu + s eps at t = 0.
  """

  def model_fn(x, t, context, mask):
    del context, mask
    t = t.reshape(-1, 1, 1, 1)
    a = 1 - t
    return (t - a * s ** 2) / (a ** 2 * s ** 2 + t ** 2) * (x - a * mu) - mu

  return model_fn


def test_gaussian_flow_reaches_the_data_at_each_solver_order():
  """Both samplers carry noise to mu + s * noise; Euler converges as 1/n, DPM-Solver++(2M) faster.

  Shift 1.0: with shift 3 the few steps near t = 0, where this narrow Gaussian bends the flow,
  dominate the error. DPM's floor (~3e-3) comes from its grid starting at t = 0.999, not 1.
  """
  mu, s = jnp.array([2.0, -1.0, 0.5, 0.0]), 0.3
  noise = jax.random.normal(jax.random.key(0), (256, 2, 2, C))
  target = mu + s * noise
  context, mask = jnp.zeros((256, 1, 1)), jnp.ones((256, 1))
  rms = {}
  for sampler in samplers.FLOW_SAMPLERS:
    for steps in (10, 20):
      x0 = samplers.sample(_gaussian_velocity(mu, s), noise, context, mask, sampler=sampler, num_steps=steps,
                           cfg_scale=1.0, shift=1.0)
      rms[sampler, steps] = float(jnp.sqrt(jnp.mean(jnp.square(x0 - target))))
    # After 20 steps the batch has the data's per-channel mean and spread.
    np.testing.assert_allclose(x0.mean(axis=(0, 1, 2)), target.mean(axis=(0, 1, 2)), atol=0.01)
    np.testing.assert_allclose(x0.std(axis=(0, 1, 2)), target.std(axis=(0, 1, 2)), atol=0.03)
  assert rms["flow_dpm", 20] < 0.01 and rms["flow_euler", 20] < 0.05, rms
  assert 1.6 < rms["flow_euler", 10] / rms["flow_euler", 20] < 2.5, rms  # first order.
  assert rms["flow_dpm", 10] / rms["flow_dpm", 20] > 3.0, rms  # second order (until the floor).
  assert rms["flow_dpm", 10] < rms["flow_euler", 10], rms


def test_guided_velocity_batches_cond_and_uncond_in_one_call():
  coef = _coefficients()
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  model = _linear_model(jnp, coef)
  batches = []

  def counting_model(x, t, ctx, m):
    batches.append(x.shape[0])
    return model(x, t, ctx, m)

  t = jnp.array([0.7, 0.3])
  v = samplers.guided_velocity(counting_model, noise, t, context, mask, null_context, null_mask, 4.5)
  assert batches == [2 * B]
  v_c = model(noise, t, context, mask)
  v_u = model(noise, t, jnp.broadcast_to(null_context, context.shape), jnp.broadcast_to(null_mask, mask.shape))
  np.testing.assert_allclose(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
  assert not np.allclose(v, v_c)  # the guidance does something here.
  # cfg 1.0 runs the conditional half only and equals the plain model.
  batches.clear()
  v1 = samplers.guided_velocity(counting_model, noise, t, context, mask, null_context, null_mask, 1.0)
  assert batches == [B]
  np.testing.assert_array_equal(v1, v_c)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpm"])
def test_cfg_one_equals_conditional_sampler(sampler):
  coef = _coefficients()
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  model = _linear_model(jnp, coef)
  kw = dict(sampler=sampler, num_steps=6, shift=3.0)
  guided = samplers.sample(model, noise, context, mask, null_context, null_mask, cfg_scale=1.0, **kw)
  plain = samplers.sample(model, noise, context, mask, cfg_scale=1.0, **kw)
  np.testing.assert_array_equal(guided, plain)
  # A traced guidance scale of 1.0 runs both halves and still agrees.
  traced = jax.jit(lambda s: samplers.sample(model, noise, context, mask, null_context, null_mask,
                                             cfg_scale=s, **kw))(jnp.float32(1.0))
  np.testing.assert_allclose(traced, plain, rtol=1e-5, atol=1e-5)


def test_guidance_interval_guides_only_inside_it():
  coef = _coefficients()
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  model = _linear_model(jnp, coef)
  t = jnp.array([0.7, 0.3])  # row 0 inside (0.5, 1.0), row 1 outside.
  v_c = model(noise, t, context, mask)
  v_u = model(noise, t, jnp.broadcast_to(null_context, context.shape), jnp.broadcast_to(null_mask, mask.shape))
  v = samplers.guided_velocity(model, noise, t, context, mask, null_context, null_mask, 4.5, (0.5, 1.0))
  np.testing.assert_allclose(v[0], (v_u + 4.5 * (v_c - v_u))[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v[1], v_c[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(v[1], (v_u + 4.5 * (v_c - v_u))[1], atol=1e-3)
  assert v.shape == noise.shape
  # Per-row scales (B, 1, 1, 1), as the Sprint teacher draws them: row 0 guided at its own scale.
  scales = jnp.array([4.0, 5.0]).reshape(-1, 1, 1, 1)
  v = samplers.guided_velocity(model, noise, t, context, mask, null_context, null_mask, scales, (0.5, 1.0))
  assert v.shape == noise.shape
  np.testing.assert_allclose(v[0], (v_u + 4.0 * (v_c - v_u))[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v[1], v_c[1], rtol=1e-5, atol=1e-5)
  # An interval covering [0, 1] is plain CFG, bit for bit.
  assert samplers.guidance_interval_is_full(None) and samplers.guidance_interval_is_full((0.0, 1.0))
  assert not samplers.guidance_interval_is_full((0.5, 1.0))
  plain = samplers.guided_velocity(model, noise, t, context, mask, null_context, null_mask, 4.5)
  np.testing.assert_array_equal(
      samplers.guided_velocity(model, noise, t, context, mask, null_context, null_mask, 4.5, (0.0, 1.0)), plain)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpm"])
def test_sampler_guidance_interval(sampler):
  """A sampler run whose interval holds no step equals the unguided run; one holding some steps
  differs from both the unguided and the fully guided runs."""
  coef = _coefficients()
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  model = _linear_model(jnp, coef)
  kw = dict(sampler=sampler, num_steps=6, shift=3.0)
  run = lambda cfg, interval=None: samplers.sample(model, noise, context, mask, null_context, null_mask,
                                                    cfg_scale=cfg, cfg_interval=interval, **kw)
  unguided, guided = run(1.0), run(4.5)
  np.testing.assert_allclose(run(4.5, (2.0, 3.0)), unguided, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(run(4.5, (0.0, 1.0)), guided)
  partial = run(4.5, (0.5, 1.0))
  assert not np.allclose(partial, unguided, atol=1e-3) and not np.allclose(partial, guided, atol=1e-3)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_dpm"])
def test_guidance_interval_runs_the_conditional_batch_alone_outside_it(sampler, monkeypatch):
  """Outside the interval a step evaluates B rows, not 2B (counted as the model runs), and the images
  equal those of the doubled batch with s = 1 there (the former path: one run, guidance per row)."""
  coef = _coefficients()
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  linear = _linear_model(jnp, coef)
  rows = []

  def model(x, t, c, m):
    jax.debug.callback(lambda n: rows.append(int(n)), jnp.int32(x.shape[0]))
    return linear(x, t, c, m)

  kw = dict(sampler=sampler, num_steps=6, shift=3.0, cfg_scale=4.5, cfg_interval=(0.5, 1.0))
  run = lambda: jax.block_until_ready(jax.jit(lambda n: samplers.sample(
      model, n, context, mask, null_context, null_mask, **kw))(noise))
  out = run()
  b = noise.shape[0]
  sigmas = samplers.timestep_grid(6, 3.0, sampler)
  inside = [0.5 <= s <= 1.0 for s in sigmas[:6]]
  assert 0 < sum(inside) < 6
  assert rows == [2 * b if g else b for g in inside]
  rows.clear()
  monkeypatch.setattr(samplers, "guidance_segments", lambda *a: [(0, 6, True)])  # every step doubled
  np.testing.assert_allclose(run(), out, rtol=1e-5, atol=1e-5)
  assert rows == [2 * b] * 6


def test_sample_errors():
  noise, context, mask, null_context, null_mask = map(jnp.asarray, _inputs())
  model = _linear_model(jnp, _coefficients())
  with pytest.raises(ValueError, match="Unknown sampler"):
    samplers.sample(model, noise, context, mask, null_context, null_mask, sampler="ddim", num_steps=2)
  with pytest.raises(ValueError, match="null_context"):
    samplers.sample(model, noise, context, mask, sampler="flow_euler", num_steps=2, cfg_scale=4.5)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.timestep_grid(0, 3.0)


def test_generator_guidance_interval_can_change_between_calls(monkeypatch):
  """Generator.cfg_interval is a static argument of the jitted sampler: setting it after a first
  call reaches the sampler (it once stayed compiled in), and each value is traced once."""
  from flax import linen as nn

  from sanajax import generation
  from sanajax.config_utils import load_config
  from sanajax.models import dcae
  from sanajax.resolution import ae_downsample
  from sanajax.workdir.loaders import build_text_encoder, init_dit_params
  cfg = load_config("tiny")
  ae = dcae.build_dcae(cfg.ae)
  ae_params = nn.unbox(ae.init(jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3))))["params"]
  traced, real = [], generation.sample_latents

  def spy(*args, cfg_interval=None, **kw):
    traced.append(cfg_interval)
    return real(*args, cfg_interval=cfg_interval, **kw)

  monkeypatch.setattr(generation, "sample_latents", spy)
  gen = generation.Generator(cfg, init_dit_params(cfg, jax.random.PRNGKey(2)), ae, ae_params, 1.0,
                             build_text_encoder(cfg), ae_downsample(cfg))
  run = lambda: gen.generate(["a red circle"], sampler="flow_euler", steps=2)
  assert gen.cfg_interval == (0.5, 1.0) == tuple(cfg.sample.cfg_interval)  # the tiny default's
  run()
  gen.cfg_interval = None
  run()
  gen.cfg_interval = [0.5, 1]  # the first interval, as a list of other number types: no new trace.
  run()
  gen.cfg_interval = (0.3, 1.0)
  run()
  assert traced == [(0.5, 1.0), None, (0.3, 1.0)]
