"""A converted SD3 pipeline samples as diffusers' StableDiffusion3Pipeline does.

A tiny random StableDiffusion3Pipeline (sd3_helpers.sd3_pipeline: 2-block SD3Transformer2DModel with QK RMSNorm
and a dual-attention block, a 16-channel AutoencoderKL, CLIP-L / bigG / T5 with offline tokenizers) is saved with
save_pretrained and converted with `python -m sanajax.convert --from=diffusers` (sd3_helpers.converted_sd3, shared
with tests/test_sd3_finetune.py); then, through the workdir's loaders
(build_text_encoder, load_dit_params), the prompt embeddings equal encode_prompt's, a 10-step Flow-Euler
sample with CFG equals the pipeline's latents (same noise, output_type="latent"), and `python -m
sanajax.sample` writes PNGs (the VAE decode with SD3's shift and scale).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sd3_helpers import SHIFT, converted_sd3, rel_err, run_module  # tests/sd3_helpers.py (tests/ on sys.path)

from sanajax.diffusion import samplers
from sanajax.generation import Generator, sample_latents
from sanajax.models.backbones import apply_conditioned, build_backbone
from sanajax.models.sd3_text import SD3PromptEncoder
from sanajax.resolution import ae_downsample
from sanajax.workdir.files import load_workdir_config
from sanajax.workdir.loaders import ae_shift_factor, build_text_encoder, load_ae, load_dit_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red cat on the left of a blue square", "big dog"]
STEPS, CFG = 10, 4.0
LATENT_HW = (6, 10)  # non-square; the VAE downsamples 2x, so images are 12 x 20.


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(pipeline as loaded from its directory, that directory, the converted workdir): sd3_helpers.converted_sd3."""
  src, work = converted_sd3(tmp_path_factory)
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(src)
  pipe.set_progress_bar_config(disable=True)
  return pipe, src, work


def test_the_workdir_config(converted):
  _, src, work = converted
  c = load_workdir_config(work)
  assert c.model.name == "mmdit" and c.model.pooled_text == "clip" and c.model.qk_norm == "rms_norm"
  assert c.ae.name == "autoencoder_kl" and (c.ae.scaling_factor, c.ae.shift_factor) == (1.5305, 0.0609)
  assert c.text.kind == "sd3" and c.text.pretrained == os.path.abspath(src) and c.text.use_t5
  assert c.diffusion.flow_shift == SHIFT and ae_downsample(c) == 2 and c.data.resolution == 16
  _, _, scaling, ae_config = load_ae(os.path.join(work, "ae"))
  assert (scaling, ae_shift_factor(ae_config)) == (1.5305, 0.0609)
  with open(os.path.join(work, "ae", "ae_info.json")) as f:
    assert json.load(f)["shift_factor"] == 0.0609


def test_prompt_embeddings_equal_encode_prompt(converted):
  pipe, _, work = converted
  enc = build_text_encoder(load_workdir_config(work), work)
  assert isinstance(enc, SD3PromptEncoder)
  ids, mask = enc.tokenize(PROMPTS)
  assert ids.shape == (2, 13 + 13 + 256) and mask.shape == (2, 13 + 256) and mask.all()
  cond = jax.jit(enc.embed)(enc.params, ids, mask)
  with torch.no_grad():
    want = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)
  assert rel_err(cond["context"], want[0]) <= 1e-4 and rel_err(cond["pooled"], want[2]) <= 1e-4
  null = enc.embed(enc.params, *enc.tokenize(["", ""]))  # the Generator's unconditional branch
  assert rel_err(null["context"], want[1]) <= 1e-4 and rel_err(null["pooled"], want[3]) <= 1e-4


def test_sample_equals_the_sd3_pipeline(converted):
  """Flow-Euler on FlowMatchEulerDiscreteScheduler(shift=3)'s sigmas, CFG 4.0, the model fed sigma (the
  pipeline's timestep / 1000), the pooled CLIP vector and the joint context, through the Generator's
  sample_latents and the workdir's loaders."""
  pipe, src, work = converted
  config = load_workdir_config(work)
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
  scheduler.set_timesteps(STEPS)
  np.testing.assert_array_equal(scheduler.sigmas.numpy(), samplers.timestep_grid(STEPS, config.diffusion.flow_shift))
  noise = np.random.default_rng(0).normal(size=(len(PROMPTS), *LATENT_HW, 16)).astype(np.float32)
  with torch.no_grad():
    want = pipe(prompt=PROMPTS, latents=torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous(),
                num_inference_steps=STEPS, guidance_scale=CFG, height=2 * LATENT_HW[0], width=2 * LATENT_HW[1],
                output_type="latent", return_dict=False)[0].permute(0, 2, 3, 1).numpy()

  enc = build_text_encoder(config, work)
  dit = build_backbone(config.model)
  params = load_dit_params(work, config)

  @jax.jit
  def run(params, text_params, ids, mask, null_ids, null_mask, noise, prompt_ids):
    apply_fn = functools.partial(apply_conditioned, dit, {"params": params})
    cond = enc.embed(text_params, prompt_ids if prompt_ids is not None else ids, mask)
    return sample_latents(apply_fn, False, noise, cond, mask, enc.embed(text_params, null_ids, null_mask), null_mask,
                          sampler="flow_euler", steps=STEPS, cfg=CFG, shift=config.diffusion.flow_shift,
                          key=jax.random.key(0))

  ids, mask = enc.tokenize(PROMPTS)
  null_ids, null_mask = enc.tokenize([""] * len(PROMPTS))
  with jax.default_matmul_precision("highest"):
    got = np.asarray(run(params, enc.params, ids, mask, null_ids, null_mask, jnp.asarray(noise), None))
    other = np.asarray(run(params, enc.params, ids, mask, null_ids, null_mask, jnp.asarray(noise), ids[::-1]))
  scale = np.abs(want).max()
  err = np.abs(got - want).max() / scale
  print(f"SD3 pipeline parity: max|sanajax - diffusers| / max|diffusers| = {err:.2e}")
  assert got.shape == want.shape and err <= 1e-4, err
  assert np.abs(other - got).max() > 1e-2 * scale  # the prompt matters: the text really enters


def test_generator_decodes_as_the_pipeline(converted):
  """The Generator's decoder undoes SD3's latent convention: vae.decode(latents / scaling_factor + shift_factor)."""
  pipe, _, work = converted
  gen = Generator.from_workdir(work)
  assert (gen.ae_scaling, gen.ae_shift) == (1.5305, 0.0609)
  latents = np.random.default_rng(1).normal(size=(2, *LATENT_HW, 16)).astype(np.float32)
  with torch.no_grad():
    z = torch.from_numpy(latents).permute(0, 3, 1, 2) / 1.5305 + 0.0609
    want = pipe.vae.decode(z, return_dict=False)[0].clamp(-1, 1).permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(gen.decode_fn)(gen.ae_params, jnp.asarray(latents)))
  assert got.shape == want.shape == (2, 12, 20, 3) and rel_err(got, want) <= 1e-4, rel_err(got, want)


def test_sample_cli_writes_pngs(converted, tmp_path):
  _, _, work = converted
  out = tmp_path / "out"
  run_module("sanajax.sample", f"--workdir={work}", "--prompt=a red cat", f"--out={out}", "--sampler=flow_euler",
             "--steps=2")
  image = np.asarray(Image.open(out / "00000.png"))
  assert image.shape == (16, 16, 3) and image.std() > 0
  assert (out / "grid.png").exists()
