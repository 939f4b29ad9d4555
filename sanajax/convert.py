"""Pretrained weights in and out: diffusers SANA / DC-AE and transformers Gemma-2 <-> sanajax.

Python API (no torch needed: safetensors files are read with a small numpy reader, memory-mapped)

    model, params = load_sana_transformer("Sana_1600M_1024px_diffusers/transformer")
    v = model.apply({"params": params}, latents, t, context, context_mask)
        # latents (B, H, W, C) float32, t (B,) = diffusers' timestep / 1000, context (B, L, caption_channels),
        # context_mask (B, L) 0/1 -> prediction (B, H, W, C) (flow velocity for SANA)
    model, params = load_sana_controlnet("Sana_600M_1024px_ControlNetPlus_diffusers/controlnet")  # docs/controlnet.md
    model, params = load_dcae("Sana_1600M_1024px_diffusers/vae")
    z = model.apply({"params": params}, images, method=model.encode)   # images (B, H, W, 3) in [-1, 1]
    x = model.apply({"params": params}, z, method=model.decode)        # raw latent, no scaling applied;
                                                                      # model.scaling_factor is the released one
    model, params = load_gemma2("Sana_1600M_1024px_diffusers/text_encoder")  # Gemma2Model or ...ForCausalLM
    h = model.apply({"params": params}, input_ids, attention_mask)     # = Gemma2Model(...).last_hidden_state
    save_diffusers(out_dir, model, params)                             # SanaDiT or DCAE -> diffusers directory

Every loader compares the tensors on disk with what the model needs before converting anything;
a missing, unexpected or mis-shaped tensor, or a truncated file, is an error that names each one.

Where the pieces live (this module re-exports the four names above and writes workdirs):
  sanajax/safetensors_io.py               safetensors read/write, model directories, the tensor check
  sanajax/models/sana_dit_diffusers.py    SanaDiT <-> SanaTransformer2DModel (config, names, directories)
  sanajax/models/dcae_diffusers.py        DCAE <-> AutoencoderDC
  sanajax/models/gemma2_transformers.py   Gemma2 <-> transformers Gemma-2, the HF tokenizer
  sanajax/workdir/loaders.py              load_text_encoder, init_params_from (workdir or diffusers dir)

Command line (an Orbax workdir that `sanajax.sample` samples from and `sanajax.train` fine-tunes):

    python -m sanajax.convert --from=diffusers --src=Sana_1600M_1024px_diffusers --dst=WORKDIR
    python -m sanajax.convert --from=transformers --src=gemma-2-2b-it --dst=TEXT_WORKDIR
    python -m sanajax.convert --to=diffusers --src=WORKDIR --dst=OUT

A converted pipeline workdir holds config.json (a full sanajax config: the SANA configs'
training/sampling sections, model/ae/text sections read from the directories),
checkpoints/0 (the DiT weights as `ema_params`, what sampling and `init_from` read),
ae/ (the DC-AE as an AE workdir: config.json, ae_info.json with the scaling factor, checkpoints)
and text_encoder/ (Gemma-2 as config.json + checkpoints, its tokenizer in text_encoder/tokenizer).
config.text.pretrained is "text_encoder", relative to the workdir, so the workdir can be moved.
A source directory with only transformer files (no model_index.json) converts the DiT alone;
give --ae and --text_encoder (converted workdirs) to complete it. Each converter holds its destination's
lock (sanajax.workdir.lock) while it writes, as a trainer does: a --dst that a training run or another
convert is writing is refused in one line, before anything is written.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import contextlib
import json
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from sanajax import cli, config_utils
from sanajax.models import (
  autoencoder_kl,
  autoencoder_kl_diffusers,
  backbones,
  dcae,
  dcae_diffusers,
  mmdit,
  mmdit_diffusers,
  sana_dit,
  sana_dit_diffusers,
)
from sanajax.models.autoencoder_kl_diffusers import load_sd3_vae
from sanajax.models.backbones import build_backbone
from sanajax.models.clip_transformers import load_clip_text_encoder
from sanajax.models.controlnet_diffusers import load_sana_controlnet
from sanajax.models.dcae_diffusers import load_dcae
from sanajax.models.gemma2_transformers import gemma2_config_from_dict, has_tokenizer, load_gemma2, load_tokenizer
from sanajax.models.lora_diffusers import load_lora, save_lora
from sanajax.models.mmdit_diffusers import load_sd3_transformer
from sanajax.models.sana_dit_diffusers import dit_init_args, load_sana_transformer
from sanajax.models.sd3_text import load_sd3_text_encoder
from sanajax.models.t5_transformers import load_t5_encoder
from sanajax.models.weights_util import abstract_params, boxed_abstract_params, put_like
from sanajax.paths import url_path_problem
from sanajax.safetensors_io import read_json
from sanajax.workdir.checkpoint import Checkpointer
from sanajax.workdir.files import (
  AE_INFO_FILE,
  ae_workdir,
  checkpoint_dir,
  load_model_workdir_config,
  load_workdir_config,
  prepare_workdir,
)
from sanajax.workdir.loaders import AUTOENCODER_KL, has_checkpoint, load_ae, load_lora_workdir
from sanajax.workdir.lock import hold_workdir

# The Python API users call as sanajax.convert.X (README "Pretrained weights"); the rest is the CLI.
__all__ = ["convert_ae", "convert_diffusers", "convert_kl_ae", "convert_sd3", "convert_text_encoder", "export_diffusers", "export_lora", "export_sd3",
           "load_clip_text_encoder", "load_dcae", "load_gemma2", "load_lora", "load_sana_controlnet", "load_sana_transformer", "load_sd3_text_encoder", "load_sd3_transformer",
           "load_sd3_vae", "load_t5_encoder", "save_diffusers"]


def save_diffusers(directory: str, model: nn.Module, params: Mapping, *, dtype: str = "float32",
                   sample_size: int | None = None) -> None:
  """Writes a sanajax SanaDiT, DCAE, MMDiT (SD3) or AutoencoderKL (SD3 VAE) as a diffusers directory
  (config.json + diffusion_pytorch_model.safetensors) that SanaTransformer2DModel / AutoencoderDC /
  SD3Transformer2DModel / AutoencoderKL.from_pretrained loads. dtype: float32 (bit-identical round
  trip), bfloat16 or float16. sample_size (SanaDiT only): diffusers' `sample_size` (latent side);
  default the model's PE base grid, else 32.
  """
  if isinstance(model, sana_dit.SanaDiT):
    sana_dit_diffusers.save_diffusers(directory, model, params, dtype=dtype, sample_size=sample_size)
  elif isinstance(model, dcae.DCAE):
    dcae_diffusers.save_diffusers(directory, model, params, dtype=dtype)
  elif isinstance(model, mmdit.MMDiT):
    mmdit_diffusers.save_diffusers(directory, model, params, dtype=dtype)
  elif isinstance(model, autoencoder_kl.AutoencoderKL):
    autoencoder_kl_diffusers.save_diffusers(directory, model, params, dtype=dtype)
  else:
    raise TypeError(f"save_diffusers exports a SanaDiT, DCAE, MMDiT or AutoencoderKL, got {type(model).__name__}.")


# --------------------------------------------------------------------------- workdirs

CONVERTED_STEP = 0  # Converted weights are step 0: fine-tuning from them starts counting at 0.


def _save_params(directory: str, params: Any) -> None:
  """Writes params as `ema_params` of an Orbax checkpoint at step 0 (what restore_params reads).

  DiT and AE params are saved boxed, in the tree model.init returns, as the trainers save them.
  Only the EMA slot is written: sampling and `init_from` read it, and a second copy of a
  1.6B model would cost another 6.4 GB of disk.
  """
  ckpt = Checkpointer(checkpoint_dir(directory), keep=1, async_save=False)
  ckpt.save(CONVERTED_STEP, {"ema_params": params}, {"converted": True})
  ckpt.close()


@contextlib.contextmanager
def _writing(*workdirs: str):
  """Holds each workdir's lock (sanajax.workdir.lock; it creates the folder) while a converter writes there,
  all taken before the first write: a destination a trainer or another convert is writing is refused before
  anything is converted. The converters of the parts take their own again (the lock is reentrant)."""
  with contextlib.ExitStack() as stack:
    for workdir in workdirs:
      stack.enter_context(hold_workdir(workdir))
    yield


def _base_config(resolution: int) -> ml_collections.ConfigDict:
  """The SANA config (configs/sana_600m.py) the training/sampling sections of a converted workdir use."""
  sana = config_utils.load_sibling(os.path.join(config_utils.REPO_CONFIG_DIR, "x.py"), "sana_600m")
  c = sana.base_config(str(resolution) if str(resolution) in sana.RESOLUTION_PRESETS else None)
  del c["resolution_presets"]  # The converted model's PE settings come from its config.json, not presets.
  c.data.resolution = resolution
  c.init_from = ""
  return c


def convert_text_encoder(src: str, dst: str, *, tokenizer_src: str | None = None, dtype: str = "float32",
                         text_config: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """transformers Gemma-2 directory -> text workdir (config.json with `text`, checkpoints/, tokenizer/)."""
  _, params, text = load_gemma2(src, dtype=dtype, return_config=True)
  for k, v in (text_config or {}).items():
    if k in ("max_length", "chi_prompt", "seed", "pretrained"):
      text[k] = v
  if "max_length" not in text:
    text.max_length = 300  # SANA's model_max_length.
  c = ml_collections.ConfigDict({"text": text})
  tok_src = tokenizer_src or (src if has_tokenizer(src) else None)
  with hold_workdir(dst):
    prepare_workdir(dst, c)
    _save_params(dst, params)
    if tok_src:
      load_tokenizer(tok_src).tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
  return text


def convert_ae(src: str, dst: str, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """diffusers AutoencoderDC directory -> AE workdir (as sanajax.train_ae writes; load_ae reads it)."""
  model, params, ae = load_dcae(src, dtype=dtype, return_config=True)
  f = dcae.downsample_factor(ae)
  c = ml_collections.ConfigDict({"ae": ae, "data": {"resolution": f}})
  with hold_workdir(dst):
    prepare_workdir(dst, c)
    _save_params(dst, put_like(boxed_abstract_params(model, jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)), params))
    with open(os.path.join(dst, AE_INFO_FILE), "w") as fh:
      json.dump({"scaling_factor": float(model.scaling_factor), "source": os.path.abspath(src)}, fh, indent=2)
  return ae


def is_sd3_pipeline(src: str) -> bool:
  """Whether `src` is a diffusers SD3 / SD3.5 pipeline: model_index.json names StableDiffusion3Pipeline, or
  transformer/config.json an SD3Transformer2DModel."""
  index, transformer = os.path.join(src, "model_index.json"), os.path.join(src, "transformer", "config.json")
  if os.path.exists(index) and read_json(index).get("_class_name") == "StableDiffusion3Pipeline":
    return True
  return os.path.exists(transformer) and read_json(transformer).get("_class_name") == mmdit_diffusers.CLASS_NAME


def convert_kl_ae(src: str, dst: str, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """diffusers AutoencoderKL directory (SD3's vae/) -> AE workdir (ae.name "autoencoder_kl"; load_ae reads it).
  ae_info.json holds its scaling_factor and shift_factor (the DiT's latents: (raw - shift) * scaling)."""
  model, params, ae = load_sd3_vae(src, dtype=dtype, return_config=True)
  ae.name = AUTOENCODER_KL
  f = model.downsample_factor
  c = ml_collections.ConfigDict({"ae": ae, "data": {"resolution": f}})
  with hold_workdir(dst):
    prepare_workdir(dst, c)
    _save_params(dst, put_like(boxed_abstract_params(model, jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)), params))
    with open(os.path.join(dst, AE_INFO_FILE), "w") as fh:
      json.dump({"scaling_factor": float(model.scaling_factor), "shift_factor": float(model.shift_factor),
                 "source": os.path.abspath(src)}, fh, indent=2)
  return ae


# The `train` fields a converted SD3 workdir takes from configs/sd3_medium.py (each cited there).
SD3_RECIPE = ("optimizer", "learning_rate", "warmup_steps", "schedule", "weight_decay", "grad_clip", "adam_eps",
              "grad_accum_steps", "ema_decay", "caption_dropout")


def convert_sd3(src: str, dst: str, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A diffusers SD3 / SD3.5 pipeline directory -> a sanajax workdir that sanajax.sample samples.

  config.json: model = the MM-DiT (name "mmdit", pooled_text "clip": SD3's pooled CLIP pair), ae = the KL
  VAE (name "autoencoder_kl", scaling_factor, shift_factor; converted to WORKDIR/ae), text.kind = "sd3"
  with text.pretrained = the pipeline directory (absolute; the CLIP-L, bigG and T5 encoders and their
  tokenizers are read there in place, so the workdir needs it; T5 is used when text_encoder_3/ exists),
  diffusion.flow_shift = scheduler_config.json's `shift` (SD3: 3.0), sampling as StableDiffusion3Pipeline's
  defaults (flow_euler, 28 steps, CFG 7.0). checkpoints/0 holds the MM-DiT weights as `ema_params`.
  Fine-tuning (configs/pretrained.py) uses SD3's recipe (SD3_RECIPE from configs/sd3_medium.py: AdamW, eps
  1e-15, text.encoder_dropout 0.463 per encoder instead of whole-caption dropout) with the batch size,
  length and checkpoint cadence of the SANA fine-tuning defaults.
  """
  _, params, model = load_sd3_transformer(os.path.join(src, "transformer"), dtype=dtype, return_config=True)
  model.pooled_text = "clip"
  with _writing(dst, os.path.join(dst, "ae")):
    ae = convert_kl_ae(os.path.join(src, "vae"), os.path.join(dst, "ae"), dtype=dtype)
    f = 2 ** (len(ae.block_out_channels) - 1)
    c = _base_config(int(model.sample_size) * f)
    c.model = model
    c.ae = ae
    c.ae.workdir = ""  # WORKDIR/ae, the trainer's default.
    if "ae_train" in c:
      del c["ae_train"]
    use_t5 = os.path.isdir(os.path.join(src, "text_encoder_3"))
    tok = os.path.join(src, "tokenizer", "tokenizer_config.json")
    clip_length = int(read_json(tok).get("model_max_length", 77)) if os.path.exists(tok) else 77
    t5_length = 256  # StableDiffusion3Pipeline's max_sequence_length.
    c.text = ml_collections.ConfigDict({"kind": "sd3", "pretrained": os.path.abspath(src), "use_t5": use_t5,
                                        "t5_max_length": t5_length, "max_length": clip_length + t5_length,
                                        "dtype": dtype, "seed": 0})
    if c.model.in_channels != c.ae.latent_channels:
      raise ValueError(f"The transformer takes {c.model.in_channels} latent channels but the VAE gives "
                       f"{c.ae.latent_channels}.")
    scheduler = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(scheduler):
      sched = read_json(scheduler)
      if sched.get("use_dynamic_shifting"):
        raise NotImplementedError(f"{scheduler}: use_dynamic_shifting (a resolution-dependent shift) is not supported.")
      c.diffusion.flow_shift = float(sched.get("shift", 1.0))
    c.sample.sampler, c.sample.steps, c.sample.cfg = "flow_euler", 28, 7.0
    sd3 = config_utils.load_sibling(os.path.join(config_utils.REPO_CONFIG_DIR, "x.py"), "sd3_medium")
    recipe = sd3.base_config(mmdit.SD3_MEDIUM)
    for field in SD3_RECIPE:
      c.train[field] = recipe.train[field]
    c.text.encoder_dropout = recipe.text.encoder_dropout
    prepare_workdir(dst, c)
    bb = build_backbone(model)
    _save_params(dst, put_like(boxed_abstract_params(bb, *backbones.init_args(model)), params))
    return c


def convert_diffusers(src: str, dst: str, *, dtype: str = "float32", ae_workdir: str = "",
                      text_workdir: str = "") -> ml_collections.ConfigDict:
  """A diffusers SANA pipeline (model_index.json; transformer/ vae/ text_encoder/ tokenizer/) or a bare
  transformer directory -> a sanajax workdir that sanajax.sample loads and sanajax.train fine-tunes.
  An SD3 / SD3.5 pipeline (is_sd3_pipeline) goes to convert_sd3."""
  if is_sd3_pipeline(src):
    return convert_sd3(src, dst, dtype=dtype)
  pipeline = os.path.exists(os.path.join(src, "model_index.json")) or os.path.isdir(os.path.join(src, "transformer"))
  if not pipeline and not os.path.exists(os.path.join(src, "config.json")):
    raise FileNotFoundError(f"{src} is neither a diffusers pipeline (model_index.json, transformer/, vae/, ...) nor "
                            f"a transformer directory (config.json + safetensors): give the folder save_pretrained "
                            f"or the Hub download wrote." if os.path.isdir(src) else f"{src} does not exist.")
  transformer_dir = os.path.join(src, "transformer") if pipeline else src
  if not pipeline and not ae_workdir:
    raise ValueError(f"{src} is a bare transformer directory: give --ae=AE_WORKDIR (a converted AutoencoderDC) "
                     f"and --text_encoder=TEXT_WORKDIR, or convert the whole pipeline directory.")
  if not pipeline and not text_workdir:
    raise ValueError(f"{src} is a bare transformer directory: give --text_encoder=TEXT_WORKDIR too.")
  dit, params, model = load_sana_transformer(transformer_dir, dtype=dtype, return_config=True)
  with _writing(dst, *([os.path.join(dst, "ae"), os.path.join(dst, "text_encoder")] if pipeline else [])):
    if pipeline:
      ae = convert_ae(os.path.join(src, "vae"), os.path.join(dst, "ae"), dtype=dtype)
      ae_ref = ""  # WORKDIR/ae, the trainer's default.
    else:
      ae, ae_ref = load_workdir_config(ae_workdir).ae, os.path.abspath(ae_workdir)
    resolution = model.sample_size * dcae.downsample_factor(ae)
    c = _base_config(resolution)
    c.model = model
    c.ae = ae
    c.ae.workdir = ae_ref
    c.ae.dtype = dtype
    if "ae_train" in c:
      del c["ae_train"]
    text = c.text
    if pipeline:
      text_cfg = convert_text_encoder(os.path.join(src, "text_encoder"), os.path.join(dst, "text_encoder"),
                                      tokenizer_src=os.path.join(src, "tokenizer"), dtype=dtype,
                                      text_config={"max_length": text.max_length, "chi_prompt": text.chi_prompt})
      text_ref = "text_encoder"
    else:
      text_cfg, text_ref = load_workdir_config(text_workdir).text, os.path.abspath(text_workdir)
    new_text = gemma2_config_from_dict(text_cfg, dtype)
    new_text.pretrained = text_ref
    new_text.max_length = text.max_length
    new_text.chi_prompt = text.chi_prompt
    new_text.seed = text.seed
    c.text = new_text
    if c.model.caption_channels != c.text.hidden_size:
      raise ValueError(f"The transformer reads captions of {c.model.caption_channels} channels but the text "
                       f"encoder gives {c.text.hidden_size}.")
    if c.model.in_channels != c.ae.latent_channels:
      raise ValueError(f"The transformer takes {c.model.in_channels} latent channels but the AE gives "
                       f"{c.ae.latent_channels}.")
    if c.model.get("guidance_embeds"):  # SANA-Sprint: sCM, 2 steps, embedded guidance 4.5 (configs/sprint_600m.py).
      c.sample.sampler, c.sample.steps, c.sample.cfg = "scm", 2, 4.5
    scheduler = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(scheduler):  # The released pipeline's flow_shift (3.0 for Sana 1024px).
      c.diffusion.flow_shift = float(read_json(scheduler).get("flow_shift", c.diffusion.flow_shift))
    prepare_workdir(dst, c)
    _save_params(dst, put_like(boxed_abstract_params(dit, *dit_init_args(model)), params))
    return c


# What an exported SD3 pipeline copies from the pipeline directory its text.pretrained names (frozen in training).
SD3_TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def export_sd3(workdir: str, dst: str, *, dtype: str = "float32", ema: bool = True) -> None:
  """An MM-DiT workdir (a converted SD3 pipeline, or a fine-tune of one) -> a diffusers directory that
  StableDiffusion3Pipeline.from_pretrained loads: transformer/ (the latest EMA weights; float32 is the
  converted tensors bit for bit), vae/ (the KL VAE, its scaling and shift factors), scheduler/ (the source
  pipeline's FlowMatchEulerDiscreteScheduler config with shift = diffusion.flow_shift), the text encoders and
  tokenizers copied from text.pretrained (text_encoder_3 / tokenizer_3 left out with text.use_t5 False), and
  model_index.json."""
  config = load_model_workdir_config(workdir)
  if config.text.get("kind") != "sd3":
    raise ValueError(f"{workdir}: text.kind={config.text.get('kind')!r}; a StableDiffusion3Pipeline needs SD3's "
                     f"text encoders (text.kind 'sd3'). Export the transformer alone with sanajax.convert."
                     f"save_diffusers.")
  src = config.text.pretrained if os.path.isabs(config.text.pretrained) else os.path.join(workdir,
                                                                                          config.text.pretrained)
  bb = build_backbone(config.model, dtype="float32")
  abstract = boxed_abstract_params(bb, *backbones.init_args(config.model))
  params = nn.unbox(Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract, ema=ema))
  save_diffusers(os.path.join(dst, "transformer"), bb.model, params, dtype=dtype)
  ae_model, ae_params, _, _ = load_ae(ae_workdir(config, workdir))
  save_diffusers(os.path.join(dst, "vae"), ae_model, ae_params, dtype=dtype)
  use_t5 = bool(config.text.get("use_t5", True))
  parts = [p for p in SD3_TEXT_PARTS if use_t5 or not p.endswith("_3")]
  for part in parts:
    if not os.path.isdir(os.path.join(src, part)):
      raise FileNotFoundError(f"{os.path.join(src, part)} does not exist: text.pretrained must be the SD3 pipeline "
                              f"directory the workdir was converted from.")
    shutil.copytree(os.path.join(src, part), os.path.join(dst, part), dirs_exist_ok=True)
  sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
  sched = read_json(sched_path) if os.path.exists(sched_path) else {
      "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
  sched["shift"] = float(config.diffusion.flow_shift)
  os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
  with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched, f, indent=2)
  index_path = os.path.join(src, "model_index.json")
  index = read_json(index_path) if os.path.exists(index_path) else {
      "_class_name": "StableDiffusion3Pipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
      "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2": [
          "transformers", "CLIPTextModelWithProjection"], "text_encoder_3": ["transformers", "T5EncoderModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
      "tokenizer_3": ["transformers", "T5TokenizerFast"]}
  index.update({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
                "transformer": ["diffusers", mmdit_diffusers.CLASS_NAME]})
  if not use_t5:
    index["text_encoder_3"], index["tokenizer_3"] = [None, None], [None, None]
  with open(os.path.join(dst, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def export_diffusers(workdir: str, dst: str, *, dtype: str = "float32", ema: bool = True) -> None:
  """A sanajax workdir's latest DiT (EMA) weights -> DST/transformer, and its AE -> DST/vae. An MM-DiT workdir
  with SD3's text encoders becomes a whole StableDiffusion3Pipeline directory (export_sd3)."""
  config = load_model_workdir_config(workdir)
  if backbones.backbone_name(config.model) == "mmdit":
    return export_sd3(workdir, dst, dtype=dtype, ema=ema)
  model_cfg = dict(config.model, dtype="float32")
  model = sana_dit.build_dit(model_cfg)
  abstract = boxed_abstract_params(model, *dit_init_args(model_cfg))
  params = nn.unbox(Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(
      abstract, ema=ema))
  save_diffusers(os.path.join(dst, "transformer"), model, params, dtype=dtype,
                 sample_size=config.model.get("sample_size"))
  ae_dir = ae_workdir(config, workdir)
  if has_checkpoint(ae_dir):
    ae_model, ae_params, _, _ = load_ae(ae_dir)
    save_diffusers(os.path.join(dst, "vae"), ae_model, ae_params, dtype=dtype)


def export_lora(workdir: str, dst: str, *, dtype: str = "float32", ema: bool = True) -> str:
  """A LoRA workdir's latest adapters -> DST/pytorch_lora_weights.safetensors, the PEFT / diffusers layout
  (models/lora_diffusers.py) that SanaPipeline.load_lora_weights(DST) loads; returns the file's path."""
  config = load_workdir_config(workdir)
  if "lora" not in config:
    raise ValueError(f"--src {workdir!r} is not a LoRA workdir (its config has no `lora` section); export a full "
                     f"model with --to=diffusers.")
  return save_lora(dst, load_lora_workdir(workdir, config, ema=ema), dropout=float(config.lora.lora_dropout),
                   dtype=dtype)


def main(argv):
  """The CLI: user errors (cli.USER_ERRORS, plus what the converters raise about their inputs: a
  ValueError / OSError naming the file or field, an unsupported variant) are one line, exit code 2."""
  try:
    _convert(argv)
  except (ValueError, OSError, NotImplementedError) as e:
    if isinstance(e, cli.USER_ERRORS):
      raise
    raise cli.UserError(str(e)) from e


def _convert(argv):
  del argv  # cli.run refuses positional arguments.
  f = flags.FLAGS
  if not f.src or not f.dst:
    raise app.UsageError("--src and --dst are required.")
  for flag, path in (("src", f.src), ("dst", f.dst)):
    if problem := url_path_problem(path):
      raise app.UsageError(f"--{flag}={path} {problem}.")
  if not os.path.isdir(f.src):
    raise app.UsageError(f"--src {f.src!r} is not a directory.")
  if f.to == "diffusers-lora":
    path = export_lora(f.src, f.dst, dtype=f.dtype)
    print(f"Exported the LoRA of {f.src} to {path} (SanaPipeline.load_lora_weights({f.dst!r})).", flush=True)
    return
  if f.to:
    if f["from"].value:
      raise app.UsageError("Give --from (import) or --to (export), not both.")
    export_diffusers(f.src, f.dst, dtype=f.dtype)
    print(f"Exported {f.src} to {f.dst} (transformer/, vae/).", flush=True)
    return
  source = f["from"].value
  if source == "diffusers":
    c = convert_diffusers(f.src, f.dst, dtype=f.dtype, ae_workdir=f.ae or "", text_workdir=f.text_encoder or "")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        abstract_params(build_backbone(c.model), *backbones.init_args(c.model))))
    print(f"Converted {f.src} -> {f.dst}: DiT {n / 1e6:.1f}M parameters, {c.data.resolution} px. Sample with "
          f"`python -m sanajax.sample --workdir={f.dst} --prompt=...`.", flush=True)
  elif source == "transformers":
    convert_text_encoder(f.src, f.dst, dtype=f.dtype)
    print(f"Converted Gemma-2 {f.src} -> {f.dst}.", flush=True)
  else:
    raise app.UsageError("Give --from=diffusers|transformers (import) or --to=diffusers (export).")


def _define_flags():
  flags.DEFINE_enum("from", None, ["diffusers", "transformers"], "Import: the layout of --src.")
  flags.DEFINE_enum("to", None, ["diffusers", "diffusers-lora"], "Export: write the sanajax workdir --src as diffusers to --dst (diffusers-lora: a LoRA workdir's adapters as pytorch_lora_weights.safetensors).")
  flags.DEFINE_string("src", None, "Source directory.")
  flags.DEFINE_string("dst", None, "Destination directory.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Import: the compute dtype written into the config (parameters stay float32). "
                    "Export: the dtype of the written tensors.")
  flags.DEFINE_string("ae", None, "Bare transformer import: a converted AE workdir.")
  flags.DEFINE_string("text_encoder", None, "Bare transformer import: a converted text-encoder workdir.")


if __name__ == "__main__":
  _define_flags()
  cli.define_flags(multihost=False)
  cli.run(main)
