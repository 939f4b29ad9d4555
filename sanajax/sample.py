"""Text-to-image sampling from a training workdir.

    python -m sanajax.sample --workdir=DIR --prompts_file=F --out=OUT \
        [--sampler=flow_dpm|flow_euler] [--steps=20] [--cfg=4.5] [--seed=0]
    python -m sanajax.sample --workdir=DIR --prompt="a red circle" --out=OUT

Writes OUT/00000.png, 00001.png, ... (one per prompt, in order) and OUT/grid.png, using
the EMA weights of the latest checkpoint in DIR.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from sanajax.diffusion import samplers
from sanajax.models.sana_dit import build_dit
from sanajax.models.text_encoder import TextEncoder
from sanajax.training.checkpoint import Checkpointer
from sanajax.training.setup import load_workdir_config


def build_text_encoder(config: ml_collections.ConfigDict) -> TextEncoder:
  """The frozen text encoder a config names (the tiny Gemma-2 over the shapes vocabulary)."""
  if config.text.kind != "tiny_gemma2":
    raise ValueError(f"config.text.kind={config.text.kind!r} is not available yet: only 'tiny_gemma2' "
                     f"(real Gemma-2-2B weights arrive through sanajax.convert).")
  from sanajax.data.shapes import VOCAB
  return TextEncoder(config.text, VOCAB)


def latent_shape(config: ml_collections.ConfigDict, downsample: int) -> tuple[int, int, int]:
  res = config.data.resolution
  if res % downsample:
    raise ValueError(f"data.resolution={res} is not a multiple of the AE's downsampling factor {downsample}.")
  return (res // downsample, res // downsample, config.ae.latent_channels)


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] float images -> uint8."""
  return np.asarray(jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8))


def make_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) image, white-padded."""
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


class Generator:
  """Prompts -> images with a DiT, a text encoder and an AE; all sampling is one jitted call per batch."""

  def __init__(self, config: ml_collections.ConfigDict, dit_params, ae_model, ae_params, ae_scaling: float,
               text_encoder: TextEncoder, ae_downsample: int):
    self.config = config
    self.dit = build_dit(config.model)
    self.dit_params = dit_params
    self.ae_model, self.ae_params, self.ae_scaling = ae_model, ae_params, ae_scaling
    self.text = text_encoder
    self.latent_shape = latent_shape(config, ae_downsample)
    null_ids, null_mask = self.text.tokenize([""])
    self._null = (jnp.asarray(null_ids), jnp.asarray(null_mask))

  @classmethod
  def from_workdir(cls, workdir: str, *, ema: bool = True) -> "Generator":
    from sanajax.models.dcae import downsample_factor
    from sanajax.train import ae_workdir, init_dit_params
    from sanajax.train_ae import load_ae
    config = load_workdir_config(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or Checkpointer(ckpt_dir, read_only=True).latest_step() is None:
      raise FileNotFoundError(f"No checkpoint under {ckpt_dir}: train first with "
                              f"`python -m sanajax.train --config=... --workdir={workdir}`.")
    ae_model, ae_params, scaling, _ = load_ae(ae_workdir(config, workdir))
    abstract = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
    params = Checkpointer(ckpt_dir, read_only=True).restore_params(abstract, ema=ema)
    return cls(config, params, ae_model, ae_params, scaling, build_text_encoder(config),
               downsample_factor(config.ae))

  @functools.partial(jax.jit, static_argnums=(0, 6, 7))
  def _sample(self, dit_params, ae_params, key, ids, mask, sampler: str, steps: int, cfg: jax.Array):
    context = self.text.embed(self.text.params, ids, mask)
    null_ids = jnp.broadcast_to(self._null[0], ids.shape)
    null_mask = jnp.broadcast_to(self._null[1], mask.shape)
    null_context = self.text.embed(self.text.params, null_ids, null_mask)
    noise = jax.random.normal(key, (ids.shape[0], *self.latent_shape), jnp.float32)
    model_fn = lambda x, t, c, m: self.dit.apply({"params": dit_params}, x, t, c, m)
    latents = samplers.sample(model_fn, noise, context, mask, null_context, null_mask, sampler=sampler,
                              num_steps=steps, cfg_scale=cfg, shift=self.config.diffusion.flow_shift)
    images = self.ae_model.apply({"params": ae_params}, latents / self.ae_scaling, method=self.ae_model.decode)
    return jnp.clip(images, -1.0, 1.0)

  def generate(self, prompts: list[str], *, sampler: str = "flow_dpm", steps: int = 20, cfg: float = 4.5,
               seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """uint8 images (N, R, R, 3), one per prompt; the noise of prompt i depends only on (seed, i)."""
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      pad = batch_size - len(chunk) if len(prompts) > batch_size else 0  # one compiled shape per run.
      ids, mask = self.text.tokenize(chunk + [""] * pad)
      key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
      images = self._sample(self.dit_params, self.ae_params, key, jnp.asarray(ids), jnp.asarray(mask),
                            sampler, int(steps), jnp.float32(cfg))
      out.append(to_uint8(images)[:len(chunk)])
    return np.concatenate(out)

  def __hash__(self):  # jit's static self: identity hashing.
    return id(self)

  def __eq__(self, other):
    return self is other


def write_images(images: np.ndarray, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out_dir, f"{i:05d}.png"))
  Image.fromarray(make_grid(images)).save(os.path.join(out_dir, "grid.png"))


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line.")
_PROMPT = flags.DEFINE_string("prompt", None, "A single prompt (instead of --prompts_file).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the PNGs.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["flow_dpm", "flow_euler"], "Default: the config's sample.sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "Default: the config's sample.steps.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale. Default: the config's sample.cfg.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per sampling call.")


def read_prompts(prompts_file: str | None, prompt: str | None) -> list[str]:
  if (prompts_file is None) == (prompt is None):
    raise app.UsageError("Give exactly one of --prompts_file or --prompt.")
  if prompt is not None:
    return [prompt]
  if not os.path.exists(prompts_file):
    raise app.UsageError(f"--prompts_file {prompts_file!r} does not exist.")
  with open(prompts_file) as f:
    prompts = [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise app.UsageError(f"--prompts_file {prompts_file!r} holds no prompts.")
  return prompts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required.")
  prompts = read_prompts(_PROMPTS_FILE.value, _PROMPT.value)
  try:
    generator = Generator.from_workdir(_WORKDIR.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  cfg = generator.config.sample
  images = generator.generate(prompts, sampler=_SAMPLER.value or cfg.sampler, steps=_STEPS.value or cfg.steps,
                              cfg=cfg.cfg if _CFG.value is None else _CFG.value, seed=_SEED.value,
                              batch_size=_BATCH.value)
  write_images(images, _OUT.value)
  print(f"Wrote {len(images)} images and grid.png to {_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
