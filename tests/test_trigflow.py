"""TrigFlow transform of a flow teacher, and the sCM sampler against diffusers' SCMScheduler / SanaSprintPipeline."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.diffusion import samplers, trigflow
from sanajax.models import sana_dit


def _sprint_model_config(**overrides):
  # Tiny and odd-sized: 3 linear heads of 8, 2 cross heads of 12, 5 latent channels.
  c = dict(config_utils.load_config("tiny").model)
  c.update(depth=1, hidden_size=24, linear_head_dim=8, cross_num_heads=2, cross_head_dim=12, caption_channels=16,
           in_channels=5, patch_size=1, qk_norm=True, timestep_scale=0.001, guidance_embeds=True)
  c.update(overrides)
  return c


def _text(batch, length, channels, key):
  ctx = jax.random.normal(key, (batch, length, channels))
  mask = np.ones((batch, length), np.int32)
  mask[0, 3:] = 0
  return ctx, jnp.asarray(mask)


def test_time_maps_and_grids():
  t = jnp.array([0.0, 0.3, math.pi / 4, 1.2, math.pi / 2])
  tf = trigflow.flow_time_from_trig(t)
  np.testing.assert_allclose(np.asarray(tf)[[0, 2, 4]], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(trigflow.trig_time_from_flow(tf), t, atol=1e-6)
  # Same signal-to-noise ratio: (cos/sin)^2 == ((1 - tf)/tf)^2.
  np.testing.assert_allclose((jnp.cos(t[1:4]) / jnp.sin(t[1:4])), (1 - tf[1:4]) / tf[1:4], rtol=1e-5)
  np.testing.assert_allclose(trigflow.flow_input_scale(tf), 1 / (jnp.sin(t) + jnp.cos(t)), rtol=1e-6)
  assert trigflow.scm_time_grid(1) == [1.5708, 0.0]
  assert trigflow.scm_time_grid(2) == [1.5708, 1.3, 0.0]
  np.testing.assert_allclose(trigflow.scm_time_grid(4), [1.5708, 1.1781, 0.7854, 0.3927, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match="num_steps"):
    trigflow.scm_time_grid(0)
  with pytest.raises(ValueError, match="intermediate_t"):
    trigflow.scm_time_grid(2, intermediate_t=1.6)


def test_grids_equal_scm_scheduler():
  pytest.importorskip("torch")
  from diffusers import SCMScheduler
  for n in (1, 2, 4):
    sched = SCMScheduler()
    sched.set_timesteps(n, intermediate_timesteps=1.3 if n == 2 else None)
    np.testing.assert_array_equal(np.float32(trigflow.scm_time_grid(n)), sched.timesteps.numpy())


def test_output_map_with_an_exact_flow_model():
  """With the exact velocity v = z - latents, F is TrigFlow's exact velocity and x0_hat the data."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  latents = jax.random.normal(k1, (3, 4, 4, 2)) * 1.7
  z = jax.random.normal(k2, latents.shape)
  t = jax.random.uniform(k3, (3,), minval=0.05, maxval=1.5)
  sd = trigflow.SIGMA_DATA
  x_t = trigflow.add_noise(sd * latents, z, t)
  x_flow, t_flow = trigflow.matched_flow_state(x_t, t)
  tf = t_flow[:, None, None, None]
  np.testing.assert_allclose(x_flow, (1 - tf) * latents + tf * z, rtol=1e-5, atol=1e-5)
  F = trigflow.flow_to_trigflow(lambda x, tf_: z - latents)(x_t / sd, t)
  np.testing.assert_allclose(F, trigflow.trig_velocity_target(sd * latents, z, t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(trigflow.denoised_from_F(x_t, t, F), sd * latents, rtol=1e-5, atol=1e-5)
  # F is also d x_t / dt / sigma_d by differentiation of the interpolant.
  dxdt = jax.jvp(lambda tt: trigflow.add_noise(sd * latents, z, tt), (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(F, dxdt / sd, rtol=1e-5, atol=1e-5)


def test_transformed_teacher_denoises_like_the_flow_teacher():
  """A random tiny DiT: TrigFlow x0_hat at (x_t, t) equals the flow model's x0_hat at the matched (x_f, t_f)."""
  c = _sprint_model_config(guidance_embeds=False, timestep_scale=1.0, qk_norm=False)
  model = sana_dit.build_dit(c)
  kx, kz, kt, kc = jax.random.split(jax.random.key(1), 4)
  latents = jax.random.normal(kx, (2, 3, 5, c["in_channels"]))
  z = jax.random.normal(kz, latents.shape)
  t = jax.random.uniform(kt, (2,), minval=0.1, maxval=1.5)
  ctx, mask = _text(2, 5, c["caption_channels"], kc)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(2), latents, t, ctx, mask)["params"])
  sd = trigflow.SIGMA_DATA

  @jax.jit
  def both(params):
    flow_fn = lambda x, tf: model.apply({"params": params}, x, tf, ctx, mask)
    x_t = trigflow.add_noise(sd * latents, z, t)
    trig_x0 = trigflow.denoised_from_F(x_t, t, trigflow.flow_to_trigflow(flow_fn)(x_t / sd, t)) / sd
    t_flow = trigflow.flow_time_from_trig(t)
    x_flow = (1 - t_flow[:, None, None, None]) * latents + t_flow[:, None, None, None] * z
    return trig_x0, trigflow.flow_denoised(x_flow, t_flow, flow_fn(x_flow, t_flow))

  trig_x0, flow_x0 = both(params)
  assert np.max(np.abs(trig_x0 - flow_x0)) <= 1e-4 * np.max(np.abs(flow_x0))
  assert np.max(np.abs(flow_x0 - latents)) > 0.1  # A random model: the check is not trivially about the data.


def test_scm_step_matches_scm_scheduler_step_by_step():
  torch = pytest.importorskip("torch")
  from diffusers import SCMScheduler
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 5)  # NHWC here, the same values as NCHW there: the step is elementwise.
  for n in (1, 2, 4):
    sched = SCMScheduler()
    sched.set_timesteps(n, intermediate_timesteps=1.3 if n == 2 else None)
    sched.set_begin_index(0)
    grid = trigflow.scm_time_grid(n)
    x = rng.standard_normal(shape).astype(np.float32) * 0.5
    for i, s in enumerate(sched.timesteps[:-1]):
      pred = rng.standard_normal(shape).astype(np.float32)
      gen = torch.Generator().manual_seed(i)
      want_next, want_x0 = sched.step(torch.tensor(pred), s, torch.tensor(x), generator=gen, return_dict=False)
      eps = torch.randn(shape, generator=torch.Generator().manual_seed(i)).numpy()  # The step's own draw.
      got_next, got_x0 = samplers.scm_step(jnp.asarray(pred), grid[i], grid[i + 1], jnp.asarray(x), jnp.asarray(eps))
      np.testing.assert_allclose(got_x0, want_x0.numpy(), rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got_next, want_next.numpy(), rtol=1e-6, atol=1e-6)
      x = want_next.numpy()
    np.testing.assert_array_equal(x, want_x0.numpy())  # The last step lands on x0 (t = 0).


def test_two_step_sample_equals_sana_sprint_pipeline():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  c = _sprint_model_config()
  kwargs = sana_dit.diffusers_kwargs(c, sample_size=3)
  torch.manual_seed(0)
  tm = diffusers.SanaTransformer2DModel(**kwargs).eval()
  with torch.no_grad():
    for prm in tm.parameters():
      prm.copy_(torch.randn_like(prm) * 0.2)
  pipe = diffusers.SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tm,
                                      scheduler=diffusers.SCMScheduler())
  pipe.set_progress_bar_config(disable=True)
  b, h, w, cfg = 2, 3, 5, 4.5
  noise = np.random.default_rng(1).standard_normal((b, c["in_channels"], h, w)).astype(np.float32)  # NCHW
  ctx, mask = _text(b, 6, c["caption_channels"], jax.random.key(3))
  with torch.no_grad():
    want = pipe(prompt_embeds=torch.tensor(np.asarray(ctx)), prompt_attention_mask=torch.tensor(np.asarray(mask)),
                latents=torch.tensor(noise), height=32 * h, width=32 * w, num_inference_steps=2, guidance_scale=cfg,
                generator=torch.Generator().manual_seed(7), output_type="latent", use_resolution_binning=False,
                return_dict=False)[0].permute(0, 2, 3, 1).numpy()
  # SCMScheduler.step draws one randn per step from the pipeline's generator; replay the first.
  eps = torch.randn((b, c["in_channels"], h, w), generator=torch.Generator().manual_seed(7)).numpy()
  params = sana_dit.params_from_diffusers_state_dict(tm.state_dict())
  model = sana_dit.build_dit(c)
  model_fn = lambda x, t, cx, m: model.apply({"params": params}, x, t, cx, m, guidance=jnp.full((b,), cfg))
  run = jax.jit(functools.partial(samplers.scm, model_fn, num_steps=2))
  got = np.asarray(run(jnp.asarray(noise.transpose(0, 2, 3, 1)), ctx, mask,
                       step_noise=jnp.asarray(eps.transpose(0, 2, 3, 1))[None]))
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
  # The re-noise draw matters (so the replay above is what makes them equal).
  other = np.asarray(run(jnp.asarray(noise.transpose(0, 2, 3, 1)), ctx, mask,
                         step_noise=-jnp.asarray(eps.transpose(0, 2, 3, 1))[None]))
  assert np.max(np.abs(other - want)) > 1e-2 * np.max(np.abs(want))


def test_scm_sampler_input_errors():
  fn = lambda x, t, cx, m: x
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="key"):
    samplers.scm(fn, x, jnp.zeros((1, 2, 4)), None, num_steps=2)
  with pytest.raises(ValueError, match="samplers.scm"):
    samplers.sample(fn, x, jnp.zeros((1, 2, 4)), None, sampler="scm", cfg_scale=1.0)
  # One step needs no key and returns the TrigFlow x0 of an identity "velocity" model.
  assert samplers.scm(fn, x + 1.0, jnp.zeros((1, 2, 4)), None, num_steps=1).shape == x.shape


def test_generation_passes_guidance_to_a_sprint_model_without_cfg_doubling():
  from sanajax.generation import sample_latents
  batches = []

  def apply_fn(x, t, c, m, guidance=None):  # A stand-in DiT: records its batch, uses every input.
    batches.append((x.shape[0], guidance is not None))
    g = 0.0 if guidance is None else guidance[:, None, None, None]
    return 0.3 * x + t[:, None, None, None] + g + jnp.mean(c, axis=(1, 2))[:, None, None, None]

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  noise = jax.random.normal(k1, (2, 3, 3, 4))
  ctx, null = jax.random.normal(k2, (2, 5, 6)), jnp.zeros((1, 5, 6))
  mask, null_mask = jnp.ones((2, 5), jnp.int32), jnp.ones((1, 5), jnp.int32)
  run = lambda embeds, sampler, steps, cfg: sample_latents(
      apply_fn, embeds, noise, ctx, mask, null, null_mask, sampler=sampler, steps=steps, cfg=cfg, shift=3.0, key=k3)
  got = run(True, "scm", 2, 4.5)
  assert batches == [(2, True), (2, True)]  # Two steps, conditional batch only, guidance given.
  want = samplers.scm(lambda x, t, c, m: apply_fn(x, t, c, m, guidance=jnp.full((2,), 4.5)), noise, ctx, mask,
                      num_steps=2, key=k3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  batches.clear()
  run(True, "flow_euler", 3, 4.5)
  assert batches == [(2, True)]  # The fori_loop body is traced once: one conditional batch.
  batches.clear()
  teacher = run(False, "scm", 1, 4.5)  # A plain flow model under scm: CFG with the null context.
  assert batches == [(4, False)]
  want = samplers.scm(lambda x, t, c, m: samplers.guided_velocity(apply_fn, x, t, c, m, null, null_mask, 4.5),
                      noise, ctx, mask, num_steps=1)
  np.testing.assert_allclose(teacher, want, rtol=1e-6, atol=1e-6)
