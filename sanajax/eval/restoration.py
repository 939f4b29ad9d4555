"""Restoration probe: GenEval-lite of held-out scenes noised to flow time t0, denoised with their prompt.

Full generation (from t = 1) only passes GenEval-lite once a model is good at every noise level,
so early in training it sits near 0 and hides progress. Restoration starts from a real scene that
the prompt describes (`shapes.scene_for_prompt`, prompts from the held-out evaluation set),
AE-encodes it, mixes in noise to x_t0 = (1 - t0) x0 + t0 eps and integrates the guided flow ODE
back to t = 0 with Flow-Euler. At t0 = 0 it scores the AE alone (~1.0); as t0 grows it measures how
well the DiT keeps shapes, colours, counts and positions that are still partly visible. It is the
learning test's most sensitive check and is printed after training (README "Results").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sanajax.data import shapes
from sanajax.diffusion import flow, samplers
from sanajax.eval import geneval_lite


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _restore(dit, ae_model, steps: int, dit_params, ae_params, ae_scaling, images, noise, t0, context, mask,
             null_context, null_mask, cfg):
  """(B, R, R, 3) images in [-1, 1] -> the same scenes noised to t0 and denoised, in [-1, 1]."""
  apply_fn = functools.partial(dit.apply, {"params": dit_params})
  latents = ae_model.apply({"params": ae_params}, images, method=ae_model.encode) * ae_scaling
  x = flow.interpolate(latents, noise, jnp.full((images.shape[0],), t0))
  sigmas = jnp.linspace(t0, 0.0, steps + 1)

  def step(i, x):
    t = jnp.full((x.shape[0],), sigmas[i])
    v = samplers.guided_velocity(apply_fn, x, t, context, mask, null_context, null_mask, cfg)
    return x + (sigmas[i + 1] - sigmas[i]) * v

  x = jax.lax.fori_loop(0, steps, step, x)
  return jnp.clip(ae_model.apply({"params": ae_params}, x / ae_scaling, method=ae_model.decode), -1.0, 1.0)


def restoration_score(generator, *, t0: float = 0.5, num_prompts: int = 240, steps: int = 30, cfg: float = 4.5,
                      seed: int = 0, batch_size: int = 64) -> dict:
  """GenEval-lite (geneval_lite.evaluate's dict, plus t0/steps/cfg) of restored held-out scenes.

  generator: a sanajax.generation.Generator (DiT, AE, text encoder). t0: flow time in [0, 1] the
  scenes are noised to. steps: Euler steps from t0 to 0 (0: the noised scenes decoded as they are, the
  baseline a DiT predicting zero velocity would reach). cfg: classifier-free guidance scale.
  The scenes, the noise and the prompts depend only on `seed`.
  """
  if not 0.0 <= t0 <= 1.0:
    raise ValueError(f"t0 must lie in [0, 1], got {t0}.")
  g = generator
  prompt_set = shapes.eval_prompt_set(num_prompts, seed=seed)
  prompts = [p for p, _ in prompt_set]
  side = int(g.config.data.resolution)
  rng = np.random.default_rng(seed)
  scenes = np.stack([shapes.scene_for_prompt(p, rng, side).image for p in prompts])
  null_ids, null_mask = (jnp.asarray(a) for a in g.text.tokenize([""]))
  null_context = g.text.embed(g.text.params, null_ids, null_mask)
  key = jax.random.PRNGKey(seed)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    ids, mask = (jnp.asarray(a) for a in g.text.tokenize(chunk))
    context = g.text.embed(g.text.params, ids, mask)
    images = jnp.asarray(scenes[start:start + batch_size], jnp.float32) / 127.5 - 1.0
    noise = jax.random.normal(jax.random.fold_in(key, start), (len(chunk), *g.latent_shape), jnp.float32)
    restored = _restore(g.dit, g.ae_model, steps, g.dit_params, g.ae_params, jnp.float32(g.ae_scaling), images,
                        noise, jnp.float32(t0), context, mask, null_context, null_mask, jnp.float32(cfg))
    out.append(np.asarray(jnp.round((restored + 1.0) * 127.5)).astype(np.uint8))
  result = geneval_lite.evaluate(np.concatenate(out), prompts, [c for _, c in prompt_set])
  result.update(t0=float(t0), steps=int(steps), cfg=float(cfg))
  return result
