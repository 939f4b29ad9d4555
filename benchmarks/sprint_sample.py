"""Benchmark: SANA-Sprint 1600M one-step sampling at 1024 px (DiT + DC-AE decode), sanajax vs diffusers.

    python benchmarks/sprint_sample.py                   # GPU: 1024 px, batch 1, 1 step (also --steps=1,2,4)
    python benchmarks/sprint_sample.py --smoke           # a tiny Sprint DiT + the tiny AE on CPU, seconds

What is timed, on both sides, from a text embedding to an image (the text encoder is outside the
timing, as a prompt's embedding is computed once): noise -> the sCM sampler's steps (the TrigFlow
transform around the Sprint DiT, CFG embedded: one DiT pass per step) -> DC-AE f32c32 decode ->
image. sanajax: one jitted call (`generation.sample_latents` with sampler "scm" and
`dcae_tiling.decode_latents`), bf16 parameters and compute. diffusers: `SanaSprintPipeline` with the
same random weights (its transformer `SanaTransformer2DModel` from configs/sprint_1600m.py via
`sana_dit.diffusers_kwargs`, its vae `AutoencoderDC` from the same config's AE, torch's default
init, seed 0, converted to Flax parameters), called with `prompt_embeds`, bf16, `output_type="pt"`
(decode included), eager and with `torch.compile` on the transformer and the VAE decoder.
Inputs: the noise and a (B, 300, 2304) caption embedding whose last quarter is masked, shared.
The images are compared (relative L2 error beside the time). 1 step needs no re-noising draw, so
the two sides compute the same function; with 2 or 4 steps their draws differ (no error shown).

Issue 5 asks for this figure next to diffusers (no target ratio); it is reported, `met` empty.
Smoke: configs/sprint_1600m.py shrunk to 1 block, h 64 (as dit_forward's smoke), with
configs/dcae_tiny.py's AE at 64 px; torch in float32 on CPU.
"""
from __future__ import annotations

import functools

import _harness as hx  # first: sets the JAX allocator environment before jax is imported
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sanajax import config_utils
from sanajax.generation import sample_latents
from sanajax.models import dcae, sana_dit
from sanajax.models.dcae_tiling import decode_latents

SMOKE_OVERRIDES = {"model.depth": 1, "model.hidden_size": 64, "model.linear_head_dim": 32, "model.cross_num_heads": 2,
                   "model.cross_head_dim": 32, "model.caption_channels": 32, "text.hidden_size": 32,
                   "text.max_length": 8}
CFG = 4.5  # SanaSprintPipeline's default guidance (configs/sprint_1600m.py sample.cfg).


def load_config(smoke: bool, attn_impl: str):
  """configs/sprint_1600m.py at 1024 px; smoke: 1 block and the tiny AE (64 px)."""
  overrides = {"model.attn_impl": attn_impl, "ae.attn_impl": attn_impl}
  if not smoke:
    return config_utils.load_config(str(hx.CONFIG_DIR / "sprint_1600m.py"), "1024", overrides)
  config = config_utils.load_config(str(hx.CONFIG_DIR / "sprint_1600m.py"), "1024", {**overrides, **SMOKE_OVERRIDES})
  tiny_ae = config_utils.load_config(str(hx.CONFIG_DIR / "dcae_tiny.py")).ae
  tiny_ae.attn_impl = attn_impl
  config.ae = tiny_ae
  config.model.in_channels = tiny_ae.latent_channels
  config.data.resolution = 64
  return config


def build(config, device: str, torch_dtype: str, skip_torch: bool):
  """(pipeline or None, DiT params bf16, AE params bf16, AE scaling factor)."""
  ae_config = config.ae
  scaling = float(ae_config.scaling_factor)
  if skip_torch:
    dit, ae = sana_dit.build_dit(config.model), dcae.build_dcae(ae_config)
    p = config.model.patch_size
    dit_params = jax.jit(lambda k: nn.unbox(dit.init(k, *[jnp.zeros(s.shape, s.dtype) for s in
                                                          sana_dit.dummy_inputs(config.model, (p, p), 1)])))(
        jax.random.PRNGKey(0))["params"]
    f = dcae.downsample_factor(ae_config)
    ae_params = jax.jit(lambda k: nn.unbox(ae.init(k, jnp.zeros((1, 2 * f, 2 * f, ae_config.in_channels))))["params"])(
        jax.random.PRNGKey(1))
    bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
    return None, bf16(dit_params), bf16(ae_params), scaling
  import diffusers
  import torch
  torch.manual_seed(0)
  transformer = diffusers.SanaTransformer2DModel(**sana_dit.diffusers_kwargs(config.model)).eval()
  vae = diffusers.AutoencoderDC(**dcae.diffusers_kwargs(ae_config)).eval()
  # diffusers' per-block keys, stacked when the config scans over layers (model.scan_layers).
  dit_params = sana_dit.to_layout(sana_dit.params_from_diffusers_state_dict(transformer.state_dict()),
                                  config.model.scan_layers)
  ae_params = dcae.params_from_diffusers_state_dict(vae.state_dict(), ae_config)
  bf16 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
  dtype = getattr(torch, torch_dtype)
  pipe = diffusers.SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=vae.to(device, dtype),
                                      transformer=transformer.to(device, dtype), scheduler=diffusers.SCMScheduler())
  pipe.set_progress_bar_config(disable=True)
  return pipe, bf16(dit_params), bf16(ae_params), float(vae.config.scaling_factor)


def make_inputs(config, batch: int, key):
  """Noise (B, h, w, C) float32, a bf16 caption embedding (B, L, D) and its mask (B, L) int32."""
  f = dcae.downsample_factor(config.ae)
  side = config.data.resolution // f
  length = config.text.max_length
  kx, kc = jax.random.split(key)
  noise = jax.random.normal(kx, (batch, side, side, config.model.in_channels), jnp.float32)
  ctx = jax.random.normal(kc, (batch, length, config.model.caption_channels), jnp.bfloat16)
  valid = max(1, (3 * length) // 4)
  mask = jnp.broadcast_to(jnp.arange(length) < valid, (batch, length)).astype(jnp.int32)
  return noise, ctx, mask


def sanajax_sampler(config, scaling: float, steps: int):
  """jitted (dit_params, ae_params, noise, ctx, mask, key) -> images (B, R, R, 3) in [-1, 1]."""
  dit, ae = sana_dit.build_dit(config.model), dcae.build_dcae(config.ae)

  @jax.jit
  def run(dit_params, ae_params, noise, ctx, mask, key):
    apply_fn = functools.partial(dit.apply, {"params": dit_params})
    latents = sample_latents(apply_fn, True, noise, ctx, mask, None, None, sampler="scm",
                             steps=steps, cfg=CFG, shift=1.0, key=key)
    images = decode_latents(ae, ae_params, (latents / scaling).astype(jnp.bfloat16), config.ae)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  return run


def main(argv=None) -> list[hx.Row]:
  p = hx.parser(__doc__.splitlines()[0])
  p.add_argument("--steps", default="1", help="comma-separated sCM step counts (default 1; 2 and 4 also work)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--attn_impl", default="auto", help="sanajax linear attention impl (DiT and AE): auto, xla, pallas")
  args = hx.finish_args(p.parse_args(argv))
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  config = load_config(args.smoke, args.attn_impl)
  device = "cpu" if args.skip_torch else hx.torch_device(args.smoke)
  torch_dtype = "float32" if args.smoke else "bfloat16"  # CPU bf16 convs take seconds.
  pipe, dit_params, ae_params, scaling = build(config, device, torch_dtype, args.skip_torch)
  noise, ctx, mask = make_inputs(config, args.batch, jax.random.PRNGKey(0))
  res = config.data.resolution
  rows = []
  for steps in [int(s) for s in args.steps.split(",")]:
    case = f"{res}px B={args.batch} {steps}-step" + (" (tiny Sprint DiT and AE)" if args.smoke else "")
    run = sanajax_sampler(config, scaling, steps)
    key = jax.random.PRNGKey(7)
    ms = hx.median_ms(lambda: run(dit_params, ae_params, noise, ctx, mask, key), **timing)
    hx.profile_calls(args.profile, f"sprint_sample_{steps}", lambda: run(dit_params, ae_params, noise, ctx, mask, key))
    figure, torch_rows = [], []
    if pipe is not None:
      import torch
      t_noise = hx.to_torch(noise, device, torch_dtype).permute(0, 3, 1, 2).contiguous()  # NCHW
      t_ctx, t_mask = hx.to_torch(ctx, device, torch_dtype), hx.to_torch(mask, device, "int64")
      call = lambda: pipe(prompt_embeds=t_ctx, prompt_attention_mask=t_mask, latents=t_noise, height=res, width=res,
                          num_inference_steps=steps, intermediate_timesteps=1.3 if steps == 2 else None,
                          guidance_scale=CFG, output_type="pt",
                          use_resolution_binning=False, return_dict=False)[0]
      with torch.inference_mode():
        eager_ms = hx.torch_median_ms(call, device=device, **timing)
        if steps == 1:  # The same function on both sides: compare the images ([0, 1] there).
          ref = call().float().permute(0, 2, 3, 1).cpu().numpy() * 2.0 - 1.0
          err = hx.rel_l2(np.asarray(jax.device_get(run(dit_params, ae_params, noise, ctx, mask, key))), ref)
        transformer, decoder = pipe.transformer, pipe.vae.decoder
        compiled_ms = None
        if args.torch_compile_backend != "none":
          pipe.transformer = hx.torch_compile(transformer, args.torch_compile_backend)
          pipe.vae.decoder = hx.torch_compile(decoder, args.torch_compile_backend)
          compiled_ms = hx.torch_median_ms(call, device=device, **timing)
        pipe.transformer, pipe.vae.decoder = transformer, decoder
      figure = [hx.vs_torch(ms, eager_ms, compiled_ms)] + ([f"rel err vs diffusers {err:.1e}"] if steps == 1 else [])
      torch_rows = hx.torch_rows("sprint_sample", case, torch_dtype, args.torch_compile_backend, eager_ms, compiled_ms)
    figure.append(f"{args.batch * 1e3 / ms:.2f} images/s")
    rows.extend(hx.case_rows("sprint_sample", case, args.attn_impl, ms, figure, "", None, torch_rows))
  hx.report(args, rows)
  return rows


if __name__ == "__main__":
  main()
