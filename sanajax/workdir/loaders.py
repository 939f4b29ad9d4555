"""Opening what a config or a workdir names: the text encoder, the AE, DiT parameters.

These are the only ways the layers above (training, generation, eval, CLIs) build the frozen
parts of a run, so a converted workdir, a trained one and a random tiny one open alike.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sanajax.data.shapes import VOCAB
from sanajax.models import autoencoder_kl, backbones, dcae
from sanajax.models import lora as lora_lib
from sanajax.models.backbones import build_backbone, context_channels
from sanajax.models.controlnet import build_controlnet
from sanajax.models.controlnet import init_args as controlnet_init_args
from sanajax.models.controlnet_diffusers import load_sana_controlnet
from sanajax.models.gemma2_transformers import (
  gemma2_config_from_dict,
  gemma2_init_args,
  has_tokenizer,
  load_gemma2,
  load_tokenizer,
)
from sanajax.models.lora_diffusers import LORA_WEIGHT_NAME, load_lora
from sanajax.models.sana_dit import is_stacked, student_params_from_teacher, to_layout
from sanajax.models.sana_dit_diffusers import load_sana_transformer
from sanajax.models.sd3_text import SD3PromptEncoder, load_sd3_text_encoder
from sanajax.models.text_encoder import TextEncoder, build_gemma2
from sanajax.models.weights_util import abstract_params, boxed_abstract_params, flat_names, put_like
from sanajax.resolution import ae_downsample
from sanajax.safetensors_io import check_tensors, tensor_shapes
from sanajax.workdir.checkpoint import Checkpointer, latest_workdir_step
from sanajax.workdir.files import (
  AE_INFO_FILE,
  CONFIG_FILE,
  checkpoint_dir,
  load_model_workdir_config,
  load_workdir_config,
)

AUTOENCODER_KL = "autoencoder_kl"  # config.ae.name of SD3's VAE (models/autoencoder_kl.py)


def build_text_encoder(config: ml_collections.ConfigDict, workdir: str | None = None) -> TextEncoder:
  """The frozen text encoder a config names: 'tiny_gemma2' (random, over the shapes vocabulary),
  'gemma2' with text.pretrained = a converted text workdir or a transformers Gemma-2 directory
  (a relative path is relative to `workdir`; see sanajax.convert), or 'sd3' with text.pretrained = a
  diffusers SD3 / SD3.5 pipeline directory (its three encoders read in place; text.use_t5,
  text.t5_max_length): an sd3_text.SD3PromptEncoder, whose embed gives {"context", "pooled"}."""
  if config.text.kind == "sd3":
    path = config.text.get("pretrained", "")
    if not path:
      raise ValueError("config.text.kind='sd3' needs config.text.pretrained: a diffusers SD3 pipeline directory.")
    if not os.path.isabs(path) and workdir:
      path = os.path.join(workdir, path)
    return SD3PromptEncoder(load_sd3_text_encoder(path, config.text.get("dtype", "float32"),
                                                  use_t5=bool(config.text.get("use_t5", True)),
                                                  t5_max_length=int(config.text.get("t5_max_length", 256))))
  if config.text.kind == "gemma2":
    path = config.text.get("pretrained", "")
    if not path:
      raise ValueError("config.text.kind='gemma2' needs config.text.pretrained: a Gemma-2 directory converted with "
                       "`python -m sanajax.convert --from=transformers` (or a transformers one).")
    if not os.path.isabs(path) and workdir:
      path = os.path.join(workdir, path)
    return load_text_encoder(path, config.text)
  if config.text.kind != "tiny_gemma2":
    raise ValueError(f"config.text.kind={config.text.kind!r} is unknown: use 'tiny_gemma2', 'gemma2' or 'sd3'.")
  return TextEncoder(config.text, VOCAB)


def place_frozen(plan, frozen: dict, text_encoder: TextEncoder) -> dict:
  """Frozen parameters {"ae": ..., "text": text_encoder params, ["teacher": ...]} as global
  arrays of `plan` (sanajax.parallel.Plan), split by its logical-axis rules like the DiT (under
  fsdp / tensor), not replicated. The AE and teacher trees carry their boxes; the text encoder's
  names come from its abstract params."""
  like = {k: (text_encoder.abstract_params() if k == "text" else v) for k, v in frozen.items()}
  return plan.place(frozen, like=like)


def latent_shape(config: ml_collections.ConfigDict, downsample: int) -> tuple[int, int, int]:
  """(h, w, C) of the latents of config.data.resolution under an AE that downsamples `downsample`x."""
  res = config.data.resolution
  if res % downsample:
    raise ValueError(f"data.resolution={res} is not a multiple of the AE's downsampling factor {downsample}.")
  return (res // downsample, res // downsample, config.ae.latent_channels)


def init_dit_params(config: ml_collections.ConfigDict, key: jax.Array):
  """DiT parameters (float32) for the config's latent and text shapes."""
  dit = build_backbone(config.model)
  h, w, c = latent_shape(config, ae_downsample(config))
  x = jnp.zeros((1, h, w, c), jnp.float32)
  ctx = jnp.zeros((1, config.text.max_length, context_channels(config.model)), jnp.float32)
  mask = jnp.ones((1, config.text.max_length), jnp.int32)
  return dit.init(key, x, jnp.zeros((1,), jnp.float32), ctx, mask)["params"]


def load_dit_params(workdir: str, config: ml_collections.ConfigDict | None = None, *, ema: bool = True):
  """The (EMA) DiT parameters of a training workdir's latest checkpoint; a clear error if it has none."""
  config = config or load_model_workdir_config(workdir)
  if latest_workdir_step(workdir) is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)}: train first with "
                            f"`python -m sanajax.train --config=... --workdir={workdir}`.")
  if "lora" in config:  # a LoRA run's checkpoints hold only the adapters (configs/lora.py)
    return load_lora_dit_params(workdir, config, ema=ema)
  # Restored in the layout the workdir was trained in, returned in `config`'s (model.scan_layers).
  saved = load_model_workdir_config(workdir)
  want_scan = bool(config.model.get("scan_layers", False))
  if bool(saved.model.get("scan_layers", False)) != want_scan:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.scan_layers = bool(saved.model.get("scan_layers", False))
  abstract = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
  params = Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract, ema=ema)
  return to_layout(params, want_scan) if is_stacked(nn.unbox(params)) != want_scan else params


def has_checkpoint(workdir: str) -> bool:
  return latest_workdir_step(workdir) is not None


def is_autoencoder_kl(ae_config: ml_collections.ConfigDict) -> bool:
  """Whether an `ae` section is SD3's KL VAE (ae.name "autoencoder_kl"); without a name it is a DC-AE."""
  return ae_config.get("name", "dcae") == AUTOENCODER_KL


def ae_shift_factor(config: ml_collections.ConfigDict) -> float:
  """The latent shift of the AE a config's `ae` section describes: the DiT's latents are
  (raw - shift) * scaling (SD3's VAE: ae.shift_factor, 0.0609; the DC-AE: 0.0)."""
  return float(config.ae.get("shift_factor", 0.0) or 0.0) if is_autoencoder_kl(config.ae) else 0.0


def load_ae(workdir: str):
  """(model, params, scaling_factor, config) of a trained or converted AE workdir (EMA weights of the latest
  step): a DC-AE, or SD3's AutoencoderKL when config.ae.name == "autoencoder_kl" (its latent shift:
  ae_shift_factor(config))."""
  config = load_workdir_config(workdir)
  if not has_checkpoint(workdir):
    raise FileNotFoundError(f"No AE checkpoint under {workdir}/checkpoints; train one with "
                            f"`python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir={workdir}`.")
  model = autoencoder_kl.build_autoencoder_kl(config.ae) if is_autoencoder_kl(config.ae) else dcae.build_dcae(config.ae)
  res = config.data.resolution
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3), jnp.float32))["params"]
  params = Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract)
  info_path = os.path.join(workdir, AE_INFO_FILE)
  scaling = float(config.ae.scaling_factor)
  if os.path.exists(info_path):
    with open(info_path) as f:
      scaling = json.load(f)["scaling_factor"]
  return model, params, scaling, config


def _is_workdir(path: str) -> bool:
  """Whether `path` is a sanajax workdir with checkpoints (else a diffusers / transformers directory)."""
  return os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(checkpoint_dir(path))


def load_text_encoder(path: str, text_config: Mapping[str, Any] | None = None,
                      tokenizer_path: str | None = None) -> TextEncoder:
  """A frozen TextEncoder from a converted text workdir (sanajax.convert --from=transformers) or a
  transformers Gemma-2 directory; `text_config` supplies max_length, chi_prompt and dtype (model
  dimensions come from `path`). Tokenizer: tokenizer_path, else path/tokenizer, path, or the
  sibling ../tokenizer of a diffusers pipeline.
  """
  run = dict(text_config or {})
  if _is_workdir(path):
    saved = load_workdir_config(path).text
    dims = gemma2_config_from_dict(saved, run.get("dtype", saved.get("dtype", "float32")))
    model = build_gemma2(dims)
    params = Checkpointer(checkpoint_dir(path), read_only=True).restore_params(
        abstract_params(model, *gemma2_init_args()))
  else:
    _, params, dims = load_gemma2(path, dtype=run.get("dtype", "float32"), return_config=True)
  candidates = [tokenizer_path] if tokenizer_path else [os.path.join(path, "tokenizer"), path,
                                                        os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                     "tokenizer")]
  tok_dir = next((c for c in candidates if c and has_tokenizer(c)), None)
  if tok_dir is None:
    raise FileNotFoundError(f"No tokenizer files (tokenizer.json / tokenizer.model) in {candidates}.")
  config = ml_collections.ConfigDict(dict(dims))
  config.max_length = int(run.get("max_length", 300))  # SANA's model_max_length.
  config.chi_prompt = run.get("chi_prompt", "") or ""
  return TextEncoder(config, tokenizer=load_tokenizer(tok_dir), params=params)


def check_init_source(path: str) -> None:
  """What init_params_from can tell without reading weights, so a trainer asks before any work: `path` must be a
  directory, and a sanajax workdir there must hold a model (an autoencoder's workdir is refused, naming the run)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from={path!r} is not a directory.")
  if _is_workdir(path):
    load_model_workdir_config(path)


def init_params_from(path: str, like: Any) -> Any:
  """DiT parameters to fine-tune from (`config.init_from`): the EMA weights of the latest checkpoint
  of a sanajax workdir (a converted one, or a finished run), or a diffusers transformer directory
  (or a pipeline directory holding transformer/).

  `like` is the freshly initialised params tree as the trainer holds it (model.init's boxed
  tree of arrays or ShapeDtypeStructs, with shardings where given); the result has its structure
  and shardings, float32.
  """
  check_init_source(path)
  if _is_workdir(path):
    ckpt = Checkpointer(checkpoint_dir(path), read_only=True)
    saved_model = load_model_workdir_config(path).model
    saved = boxed_abstract_params(build_backbone(saved_model), *backbones.init_args(saved_model))
    stacked = is_stacked(nn.unbox(like))
    if is_stacked(nn.unbox(saved)) != stacked:  # saved in the other block layout (model.scan_layers)
      saved_shapes = tensor_shapes(flat_names(to_layout(saved, stacked)))
      if saved_shapes == tensor_shapes(flat_names(like)):
        return put_like(like, to_layout(nn.unbox(ckpt.restore_params(saved, ema=True)), stacked))
    saved_shapes, like_shapes = tensor_shapes(flat_names(saved)), tensor_shapes(flat_names(like))
    if saved_shapes == like_shapes:
      return ckpt.restore_params(like, ema=True)
    # A model with leaves the saved one lacks (SANA-Sprint phase 1 adds q/k RMSNorm and a CFG
    # embedder to a trained teacher): every saved weight goes to its place, the new leaves keep
    # their init (norm scales 1, the CFG embedder's zero last layer); any other difference raises.
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(like)):
      raise ValueError(f"init_from={path!r}: the saved model's parameters differ from this model's, and the new "
                       f"ones need initial values (pass initialised parameters, not abstract ones).")
    values = student_params_from_teacher(nn.unbox(ckpt.restore_params(saved, ema=True)), nn.unbox(like))
    print(f"init_from {path}: the saved model lacks {len(like_shapes) - len(saved_shapes)} parameter "
          f"arrays of this one (e.g. q/k norms); they keep their initial values.", flush=True)
    return put_like(like, values)
  if os.path.exists(os.path.join(path, "transformer", "config.json")):
    path = os.path.join(path, "transformer")
  _, params = load_sana_transformer(path, scan_layers=is_stacked(nn.unbox(like)))
  check_tensors(tensor_shapes(flat_names(params)), tensor_shapes(flat_names(like)), path)
  return put_like(like, params)


# --- LoRA workdirs (configs/lora.py): a frozen base named by config.lora.base, adapters in the checkpoints ---

def lora_base_path(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The base model a LoRA config adapts (config.lora.base: a sanajax workdir or a diffusers directory)."""
  base = config.lora.get("base", "")
  if not base:
    raise ValueError("config.lora.base is empty: name the model the adapters go on (configs/lora.py:WORKDIR).")
  return base if os.path.isabs(base) or not workdir else os.path.join(workdir, base)


def lora_abstract(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(boxed abstract DiT params, boxed abstract adapter tree) of a LoRA config (nothing allocated)."""
  spec = lora_lib.LoraSpec.from_config(config.lora)
  like = jax.eval_shape(lambda: init_dit_params(config, jax.random.PRNGKey(0)))
  paths = lora_lib.target_paths(like, spec.target_modules)
  return like, jax.eval_shape(lambda: lora_lib.init(jax.random.PRNGKey(0), like, paths, spec.r, boxed=True))


def load_lora_workdir(workdir: str, config: ml_collections.ConfigDict | None = None, *, ema: bool = True) -> dict:
  """The adapters of a LoRA training workdir's latest checkpoint as sanajax.models.lora's flat dict
  {path: {"a", "b", "alpha"}} (alpha = config.lora.lora_alpha)."""
  config = config or load_model_workdir_config(workdir)
  if latest_workdir_step(workdir) is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(workdir)}: train the LoRA first with "
                            f"`python -m sanajax.train --config=configs/lora.py:BASE --workdir={workdir}`.")
  _, abstract = lora_abstract(config)
  tree = Checkpointer(checkpoint_dir(workdir), read_only=True).restore_params(abstract, ema=ema)
  return lora_lib.flat(tree, alpha=float(config.lora.lora_alpha))


def is_lora_workdir(path: str) -> bool:
  return _is_workdir(path) and "lora" in load_workdir_config(path)


def check_adapter_source(path: str) -> None:
  """What load_adapter can tell without reading weights, so the sampler asks before the model loads: `path`
  exists, and a sanajax workdir there is a LoRA run's (a model's or an autoencoder's holds no adapters)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"LoRA {path!r} does not exist (a LoRA workdir, or a directory holding "
                            f"{LORA_WEIGHT_NAME}).")
  if _is_workdir(path) and not is_lora_workdir(path):
    raise FileNotFoundError(f"LoRA {path!r} is a sanajax workdir of another kind of run (its config has no lora "
                            f"section): pass a LoRA workdir (python -m sanajax.train --config=configs/lora.py:BASE) "
                            f"or a directory holding {LORA_WEIGHT_NAME}.")


def load_adapter(path: str) -> dict:
  """LoRA adapters from a LoRA training workdir, or a PEFT / diffusers LoRA (a directory holding
  pytorch_lora_weights.safetensors, or the file; sanajax.models.lora_diffusers.load_lora)."""
  check_adapter_source(path)
  return load_lora_workdir(path) if is_lora_workdir(path) else load_lora(path)


def apply_adapters(params: Any, adapters: Sequence[tuple[str, float]]) -> Any:
  """DiT params with each (LoRA path, scale) merged in, in order (sanajax.models.lora.merge): stacked adapters."""
  for path, scale in adapters:
    params = lora_lib.merge(params, load_adapter(path), scale)
  return params


def load_lora_dit_params(workdir: str, config: ml_collections.ConfigDict, *, ema: bool = True) -> Any:
  """A LoRA workdir's DiT: its base's parameters (float32) with the adapters merged at scale 1."""
  like, _ = lora_abstract(config)
  base = nn.unbox(init_params_from(lora_base_path(config, workdir), like))
  return lora_lib.merge(base, load_lora_workdir(workdir, config, ema=ema))


def is_controlnet_workdir(path: str) -> bool:
  """Whether `path` is a ControlNet training workdir (its config has a `controlnet` section)."""
  return _is_workdir(path) and "controlnet" in load_workdir_config(path)


def load_controlnet(path: str):
  """(model, params, base_workdir or None) of a ControlNet: a ControlNet training workdir (EMA weights of
  its latest checkpoint; base_workdir: the DiT it was trained on) or a diffusers SanaControlNetModel /
  SanaControlNetPipeline directory (base None)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"ControlNet {path!r} is not a directory (a ControlNet workdir or a diffusers one).")
  if not is_controlnet_workdir(path):
    if _is_workdir(path):  # a model's or an autoencoder's run: its folder holds no diffusers weights either
      raise FileNotFoundError(f"ControlNet {path!r} is a sanajax workdir of another kind of run (its config has no "
                              f"controlnet section): pass a ControlNet workdir (python -m sanajax.train "
                              f"--config=configs/controlnet_tiny.py:BASE) or a diffusers SanaControlNetModel "
                              f"directory.")
    model, params = load_sana_controlnet(path)
    return model, params, None
  config = load_workdir_config(path)
  if latest_workdir_step(path) is None:
    raise FileNotFoundError(f"No checkpoint under {checkpoint_dir(path)}: train the ControlNet first.")
  model = build_controlnet(config.model, int(config.controlnet.num_layers))
  abstract = boxed_abstract_params(model, *controlnet_init_args(config.model))
  params = Checkpointer(checkpoint_dir(path), read_only=True).restore_params(abstract, ema=True)
  return model, params, config.controlnet.base_workdir
