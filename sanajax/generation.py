"""Prompts -> images: the text encoder, the DiT sampler and the AE decoder in one jitted call.

Used by `python -m sanajax.sample`, by training's final evaluation and by notebooks.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from sanajax.data.buckets import check_sample_size
from sanajax.diffusion import flow, samplers
from sanajax.extras import MissingPackageError
from sanajax.models.backbones import apply_conditioned, build_backbone
from sanajax.models.controlnet import ControlledDiT, encode_control
from sanajax.models.dcae_tiling import decode_latents
from sanajax.models.gemma2_transformers import missing_tokenizer_package
from sanajax.models.quantize import check_mode, quantize_backbone
from sanajax.models.text_encoder import TextEncoder
from sanajax.parallel import Plan
from sanajax.resolution import ae_downsample
from sanajax.workdir.files import ae_workdir, load_model_workdir_config
from sanajax.workdir.loaders import (
  ae_shift_factor,
  apply_adapters,
  build_text_encoder,
  latent_shape,
  load_ae,
  load_dit_params,
  place_frozen,
)


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


def sample_latents(apply_fn, guidance_embeds: bool, noise: jax.Array, context: jax.Array, mask: jax.Array,
                   null_context: jax.Array, null_mask: jax.Array, *, sampler: str, steps: int, cfg, shift: float,
                   key: jax.Array, cfg_interval: tuple[float, float] | None = None) -> jax.Array:
  """Latents (B, H, W, C) from noise with any sampler, for a plain or a Sprint (guidance-embedding) DiT.

  apply_fn(x, t, context, mask[, guidance=]) -> flow velocity (a bound SanaDiT.apply).
  guidance_embeds: a Sprint student embeds `cfg` as its guidance input (it was distilled from the
    guided teacher), so it runs one conditional batch, no [cond; uncond] doubling, with any sampler.
    A plain flow model gets classifier-free guidance with the null context, also under "scm"
    (the TrigFlow-transformed teacher).
  key: the sCM sampler's re-noising draws (unused by the flow samplers).
  cfg_interval: the flow samplers' guidance interval (samplers.guided_velocity; None: every step).
  """
  if guidance_embeds:
    guidance = jnp.broadcast_to(jnp.asarray(cfg, jnp.float32), (noise.shape[0],))
    model_fn = lambda x, t, c, m: apply_fn(x, t, c, m, guidance=guidance)
    flow_cfg = 1.0  # A Python 1.0: the flow samplers skip the unconditional half.
  else:
    model_fn, flow_cfg = apply_fn, cfg
  if sampler == "scm":
    if not guidance_embeds:
      model_fn = functools.partial(_guided, model_fn, null_context=null_context, null_mask=null_mask, cfg=cfg)
    return samplers.scm(model_fn, noise, context, mask, num_steps=steps, key=key)
  return samplers.sample(model_fn, noise, context, mask, null_context, null_mask, sampler=sampler,
                         num_steps=steps, cfg_scale=flow_cfg, shift=shift, cfg_interval=cfg_interval)


class Generator:
  """Prompts -> images with a DiT, a text encoder and an AE; all sampling is one jitted call per batch.

  plan (sanajax.parallel.Plan; default one device): the DiT, AE and text-encoder parameters are
  split by its logical-axis rules (Plan.place), each batch of prompts over data x fsdp, and the
  sampling call is jitted with those in/out shardings and traced under the plan (block-boundary
  constraints, sequence-parallel layers). Images equal the single-device ones (the noise is
  drawn with the partitionable threefry, whatever the layout).
  """

  def __init__(self, config: ml_collections.ConfigDict, dit_params, ae_model, ae_params, ae_scaling: float,
               text_encoder: TextEncoder, ae_downsample: int, *, plan: Plan | None = None, ae_shift: float = 0.0,
               quantize: str = "none"):
    """ae_scaling, ae_shift: the DiT's latents are (raw - ae_shift) * ae_scaling (SD3's VAE: its
    scaling_factor and shift_factor; the DC-AE: shift 0), so decoding takes latents / ae_scaling + ae_shift.
    text_encoder: a TextEncoder, or anything with its tokenize / embed / params / abstract_params
    (sd3_text.SD3PromptEncoder, whose embed gives {"context", "pooled"}).
    quantize: the DiT's post-training quantization, a sanajax.models.quantize mode (none, int8,
    int8_dynamic, fp8; docs/quantization.md); the text encoder and the AE stay as they are."""
    self.config = config
    self.plan = plan = plan or Plan.single_device()
    # Optional guidance interval of the flow samplers (config.sample.cfg_interval; absent or None:
    # guidance at every step). May be changed between calls: it is a static argument of the jit.
    self.cfg_interval = config.get("sample", {}).get("cfg_interval")
    self.dit = build_backbone(config.model)
    self.text = text_encoder
    placed = place_frozen(plan, {"ae": ae_params, "text": text_encoder.params}, text_encoder)
    self.dit_params, self.text_params = plan.place(dit_params), placed["text"]
    self.quantize = quantize
    self.dit, self.dit_params = quantize_backbone(self.dit, self.dit_params, quantize, config.model)
    self.ae_model, self.ae_params, self.ae_scaling, self.ae_shift = ae_model, placed["ae"], ae_scaling, ae_shift
    self.latent_shape = latent_shape(config, ae_downsample)  # (h, w, C); generate(height=, width=) changes it
    self.ae_downsample = ae_downsample
    null_ids, null_mask = self.text.tokenize([""])
    self._null = (jnp.asarray(null_ids), jnp.asarray(null_mask))
    self._jitted = {}

  @property
  def cfg_interval(self) -> tuple[float, float] | None:
    return self._cfg_interval

  @cfg_interval.setter
  def cfg_interval(self, interval) -> None:
    self._cfg_interval = samplers.as_cfg_interval(interval)

  @classmethod
  def from_workdir(cls, workdir: str, *, ema: bool = True, plan: Plan | None = None,
                   quantize: str = "none", loras: tuple[tuple[str, float], ...] = ()) -> Generator:
    check_mode(quantize, check_platform=True)  # before anything loads
    config = load_model_workdir_config(workdir)
    if missing := missing_tokenizer_package(config.text.kind):
      raise MissingPackageError(missing)
    params = load_dit_params(workdir, config, ema=ema)
    params = apply_adapters(params, loras)  # LoRAs (path, scale) merged in order: sanajax.models.lora
    ae_model, ae_params, scaling, ae_config = load_ae(ae_workdir(config, workdir))
    return cls(config, params, ae_model, ae_params, scaling, build_text_encoder(config, workdir),
               ae_downsample(config), plan=plan, ae_shift=ae_shift_factor(ae_config), quantize=quantize)

  def latents_fn(self, dit_params, text_params, key, ids, mask, sampler: str, steps: int, cfg: jax.Array,
                 cfg_interval: tuple[float, float] | None, negative=None) -> tuple[jax.Array, jax.Array]:
    """(noise, latents), both (B, h, w, C) float32, for a batch of token ids: the sampler's start and
    result before the AE decoder (pure; jit it with sampler, steps and cfg_interval static).
    negative: (ids, mask) (1, L) of the negative prompt CFG guides away from (None: the empty prompt)."""
    context = self.text.embed(text_params, ids, mask)
    negative_ids, negative_mask = self._null if negative is None else negative
    null_ids = jnp.broadcast_to(negative_ids, ids.shape)
    null_mask = jnp.broadcast_to(negative_mask, mask.shape)
    null_context = self.text.embed(text_params, null_ids, null_mask)
    noise = jax.random.normal(key, (ids.shape[0], *self.latent_shape), jnp.float32)
    noise = jax.lax.with_sharding_constraint(noise, self.plan.batch_sharding(noise.ndim))
    apply_fn = functools.partial(apply_conditioned, self.dit, {"params": dit_params})
    with self.plan.activate():
      latents = sample_latents(apply_fn, self.dit.guidance_embeds, noise, context, mask, null_context, null_mask,
                               sampler=sampler, steps=steps, cfg=cfg, shift=self._flow_shift(),
                               key=jax.random.fold_in(key, 1), cfg_interval=cfg_interval)
    return noise, latents

  def _flow_shift(self) -> float:
    """The sampling grid's shift at the current image size (flow.shift_for_size)."""
    h, w = (n * self.ae_downsample for n in self.latent_shape[:2])
    return flow.shift_for_size(self.config.diffusion, h, w, int(self.config.data.resolution))

  def _sample_fn(self, dit_params, ae_params, text_params, key, ids, mask, sampler: str, steps: int, cfg: jax.Array,
                 cfg_interval: tuple[float, float] | None, negative=None):
    """Images (B, R, R, 3) in [-1, 1] float32 for a batch of token ids (pure; jitted by the callers)."""
    _, latents = self.latents_fn(dit_params, text_params, key, ids, mask, sampler, steps, cfg, cfg_interval, negative)
    return self.decode_fn(ae_params, latents)

  def decode_fn(self, ae_params, latents: jax.Array) -> jax.Array:
    """The DiT's latents (B, h, w, C) -> images (B, h f, w f, 3) in [-1, 1] float32 (pure): the AE decodes
    raw = latents / ae_scaling + ae_shift, the inverse of the trainer's (raw - ae_shift) * ae_scaling."""
    # Tiled (overlapping tiles, one at a time) above config.ae.tile_size_px, e.g. 2K/4K with f32c32.
    images = decode_latents(self.ae_model, ae_params, latents / self.ae_scaling + self.ae_shift, self.config.ae)
    return jnp.clip(images, -1.0, 1.0)

  def sample_batch(self, ids, mask, key: jax.Array, *, sampler: str, steps: int, cfg: float,
                   negative=None) -> jax.Array:
    """Float images (B, R, R, 3) in [-1, 1] for tokenized prompts (B, L); B must be a multiple of the
    plan's batch shards and the images come back split over data x fsdp. One compiled program per
    (sampler, steps, cfg interval), jitted with the plan's shardings. negative: the tokenized negative
    prompt (ids, mask) (1, L), an argument of that program (None: the empty prompt, plain CFG)."""
    interval = self.cfg_interval
    fn = self._jitted.get((sampler, int(steps), interval, self.latent_shape))
    if fn is None:
      layout = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      rep, batch2 = self.plan.replicated, self.plan.batch_sharding(2)
      fn = jax.jit(lambda d, a, t, k, i, m, c, n: self._sample_fn(d, a, t, k, i, m, sampler, int(steps), c, interval,
                                                                  n),
                   in_shardings=(layout(self.dit_params), layout(self.ae_params), layout(self.text_params), rep,
                                 batch2, batch2, rep, rep),
                   out_shardings=self.plan.batch_sharding(4))
      self._jitted[(sampler, int(steps), interval, self.latent_shape)] = fn  # one program per image size too
    batch = self.plan.shard_global_batch({"ids": ids, "mask": mask})
    key = self.plan.replicate(key)
    negative = self._null if negative is None else negative
    return fn(self.dit_params, self.ae_params, self.text_params, key, batch["ids"], batch["mask"],
              self.plan.replicate(np.float32(cfg)), self.plan.replicate(tuple(negative)))

  def generate(self, prompts: list[str], *, sampler: str = "flow_dpm", steps: int = 20, cfg: float = 4.5,
               seed: int = 0, batch_size: int = 64, progress: str | None = None,
               negative_prompt: str = "", height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 images (N, R, R, 3), one per prompt; the noise of prompt i depends only on (seed, i).

    sampler: "flow_dpm" | "flow_euler" | "scm" (SANA-Sprint, steps 1-4). cfg: the CFG scale; for a
    model with guidance_embeds (a Sprint student) it is the model's guidance input (Sprint: 4.5)
    and no unconditional batch is run. progress: a progress-bar label (None: no bar).
    negative_prompt: what CFG's unconditional half is conditioned on ("": the null prompt the model
    was trained with; unused by a Sprint student, which runs no unconditional half).
    height, width: image size in pixels (None: data.resolution); any multiple of the AE downsampling x
    patch size, e.g. an aspect-ratio bucket (buckets.check_sample_size: a ValueError naming the nearest
    sizes otherwise). The flow shift follows the size when diffusion.resolution_shift is on.
    """
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"Unknown sampler {sampler!r}; choose one of {samplers.SAMPLERS}.")
    res = int(self.config.data.resolution)
    h, w = check_sample_size(self.config, height or res, width or res)
    self.latent_shape = (h // self.ae_downsample, w // self.ae_downsample, self.latent_shape[2])
    negative = self.text.tokenize([negative_prompt]) if negative_prompt else None
    out = []
    bar = tqdm(total=len(prompts), desc=progress, unit="image", disable=progress is None or jax.process_index() != 0,
               dynamic_ncols=True, mininterval=2.0)
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      pad = batch_size - len(chunk) if len(prompts) > batch_size else 0  # one compiled shape per run.
      pad += -(len(chunk) + pad) % self.plan.batch_shards()  # splits over data x fsdp; row i's noise is kept
      ids, mask = self.text.tokenize(chunk + [""] * pad)
      key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
      images = self.sample_batch(ids, mask, key, sampler=sampler, steps=steps, cfg=cfg, negative=negative)
      if not images.is_fully_addressable:  # Multi-host: every process gets all images.
        images = multihost_utils.process_allgather(images, tiled=True)
      out.append(to_uint8(images)[:len(chunk)])
      bar.update(len(chunk))
    bar.close()
    return np.concatenate(out)

  def attach_controlnet(self, controlnet, controlnet_params) -> None:
    """Steers every later sample with a ControlNet (sanajax.models.controlnet; docs/controlnet.md): the
    DiT becomes a ControlledDiT, so every sampler (a Sprint student's scm included) runs base + ControlNet.
    Give the condition with set_control before generating."""
    if isinstance(self.dit, ControlledDiT):
      raise ValueError("This Generator already has a ControlNet.")
    self.dit = ControlledDiT(self.dit, controlnet)
    self.dit_params = {"base": self.dit_params, "controlnet": self.plan.place(controlnet_params),
                       "control": None, "scale": self.plan.replicate(np.float32(1.0))}
    self._jitted = {}  # compiled for the plain DiT's parameters
    self._encode_control = jax.jit(lambda a, x: encode_control(self.ae_model, a, x, self.ae_scaling, self.ae_shift))

  def set_control(self, images: np.ndarray, scale: float = 1.0) -> None:
    """The condition of the next generate calls: uint8 condition images (1 or B, R, R, 3) at the data
    resolution (an edge, depth or HED map; one image steers every prompt, B images one prompt each, B =
    the prompts of each sampling call), AE-encoded here; scale: controlnet_conditioning_scale."""
    if not isinstance(self.dit, ControlledDiT):
      raise ValueError("set_control needs a ControlNet: call attach_controlnet first.")
    images = np.asarray(images)
    r = int(self.config.data.resolution)
    if images.ndim != 4 or images.shape[1:] != (r, r, 3):
      raise ValueError(f"control images must be uint8 (N, {r}, {r}, 3), got {images.shape} "
                       f"(sanajax.data.conditions.load_control_image resizes a file).")
    unit = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
    latents = self._encode_control(self.ae_params, self.plan.replicate(unit))
    self.dit_params = {**self.dit_params, "control": latents, "scale": self.plan.replicate(np.float32(scale))}

  def __hash__(self):  # jit's static self: identity hashing.
    return id(self)

  def __eq__(self, other):
    return self is other


def _guided(model_fn, x, t, context, mask, *, null_context, null_mask, cfg):
  """CFG-guided flow velocity of a plain flow model (for sampling it with the sCM sampler)."""
  return samplers.guided_velocity(model_fn, x, t, context, mask, null_context, null_mask, cfg)


MAX_PROMPT_WARNINGS = 5


def truncation_warnings(text_encoder: TextEncoder, prompts: list[str]) -> list[str]:
  """One line per prompt longer than the text encoder reads (text.max_length tokens, BOS included).

  The tokenizer keeps the START of a long prompt (WordTokenizer and transformers' truncation=True
  both cut the end; with a CHI prompt, chi_tokenize keeps the same first prompt tokens). The line
  says which end it found kept by comparing the kept ids with the prompt's own.
  """
  tok = text_encoder.tokenizer
  bos = len(tok.encode(""))
  _, empty_mask = text_encoder.tokenize([""])
  fixed = int(np.asarray(empty_mask).sum())  # kept positions that are not the prompt's (BOS, CHI tail)
  ids, mask = (np.asarray(a) for a in text_encoder.tokenize(prompts))
  lines = []
  for i, prompt in enumerate(prompts):
    own = list(tok.encode(prompt))[bos:]
    kept = int(mask[i].sum()) - fixed
    if len(own) <= kept:
      continue
    kept_ids = list(ids[i][mask[i] == 1][len(ids[i][mask[i] == 1]) - kept:]) if kept > 0 else []
    end = "first" if kept_ids == own[:kept] else ("last" if kept_ids == own[-kept:] else "")
    which = f"its {end} {kept}" if end else f"{kept}"
    lines.append(f"Warning: prompt {i} has {len(own)} tokens; the text encoder reads only {which} "
                 f"(text.max_length={text_encoder.max_length} with BOS): the rest is ignored.")
  if len(lines) > MAX_PROMPT_WARNINGS:
    lines = lines[:MAX_PROMPT_WARNINGS] + [f"Warning: ... and {len(lines) - MAX_PROMPT_WARNINGS} more long prompts."]
  return lines


def write_images(images: np.ndarray, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out_dir, f"{i:05d}.png"))
  Image.fromarray(make_grid(images)).save(os.path.join(out_dir, "grid.png"))
