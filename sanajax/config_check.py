"""Checks a whole config before any work, reporting every bad field at once.

    validate_config(config, "dit")     # sanajax.train: the DiT (and the AE it trains first, `ae_train`)
    validate_config(config, "ae")      # sanajax.train_ae
    validate_config(config, "sprint")  # sanajax.distill_sprint

The trainers call it first, so a bad value fails in a second with one `ConfigError` naming each
bad field and what it may be ("train.batch_size=0: must be a positive integer"), not after
minutes of AE training or compiling, as a ZeroDivisionError or a message blaming another part.
Checks that already exist below this layer are called, not copied: the resolution presets
(resolution.apply_resolution), the mesh against the devices (parallel.Plan.from_config), the batch
split over processes and batch shards (host_batch_size), remat policy names, dtype names.

Layer: imports config_utils' neighbours only (resolution, models, diffusion, parallel, dtypes), so
every layer above may use it; training.optim takes its optimizer and schedule names from here.
"""
from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

import jax

from sanajax import extras
from sanajax.data.buckets import BUCKET_KINDS
from sanajax.data.sources import bare_folder_hint, webdataset_matches
from sanajax.diffusion import flow, samplers
from sanajax.dtypes import DTYPES
from sanajax.models.backbones import BACKBONES, POOLED_TEXT, build_backbone, init_args
from sanajax.models.gemma2_transformers import missing_tokenizer_package
from sanajax.models.layers import remat_policy
from sanajax.models.lora import target_paths as lora_target_paths
from sanajax.models.mmdit import JOINT_ATTENTION_KINDS
from sanajax.models.weights_util import abstract_params
from sanajax.parallel import MESH_AXES, Plan
from sanajax.paths import url_path_problem
from sanajax.resolution import ae_downsample, apply_resolution

KINDS = ("dit", "ae", "sprint")
OPTIMIZERS = ("adamw", "came", "muon")  # train.optimizer (sanajax.training.optim.build_optimizer)
SCHEDULES = ("constant", "cosine")  # train.schedule
DATA_SOURCES = ("'shapes', 'folder:DIR', 'arrayrecord:DIR' or 'cache:DIR' with DIR an existing folder, "
                "'webdataset:GLOB' matching .tar shards, or 'tfds:NAME[:SPLIT]'")


# Config fields that name a workdir or folder of this machine (the data source is checked with its kind).
PATH_FIELDS = ("ae.workdir", "teacher_workdir", "init_from", "train.init_from", "lora.base")


class ConfigError(ValueError):
  """Every bad field of a config, one "field=value: must be ..." per problem (`problems`).

  str() is one line (the CLIs print it as is): "3 bad config fields: a=0: must be ...; b=...".
  """

  def __init__(self, problems: Iterable[str]):
    self.problems = list(problems)
    n = len(self.problems)
    super().__init__(f"{n} bad config field{'s' if n != 1 else ''}: " + "; ".join(self.problems))


def host_batch_size(plan: Any, batch_size: int) -> int:
  """This process's share of the global `batch_size` (config.train.batch_size) under `plan`.

  A clear error for a batch that does not split evenly over the processes and over the mesh's
  data x fsdp shards (plan.batch_shards()). Used by the trainers (training.state.init_run_state)
  and by validate_config, so the error comes before any work.
  """
  batch = int(batch_size)
  if batch % plan.batch_shards() or batch % jax.process_count():
    raise ValueError(f"train.batch_size={batch} must be a multiple of the batch shards ({plan.batch_shards()} = "
                     f"mesh data x fsdp) and of the process count ({jax.process_count()}).")
  return batch // jax.process_count()


_MISSING = object()


def _show(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


class _Checker:
  """Collects "field=value: must be ..." lines for one config; each method checks one field."""

  def __init__(self, config: Any):
    self.config = config
    self.problems: list[str] = []

  def get(self, field: str) -> Any:
    node = self.config
    for name in field.split("."):
      if not hasattr(node, "get"):
        return _MISSING
      node = node.get(name, _MISSING)
      if node is _MISSING:
        return _MISSING
    return node

  def bad(self, field: str, value: Any, why: str) -> None:
    self.problems.append(f"{field}={_show(value)}: {why}")

  def present(self, field: str, required: bool) -> Any:
    value = self.get(field)
    if value is _MISSING and required:
      self.problems.append(f"{field}: missing (the config file must set it)")
    return value

  def int_at_least(self, field: str, lo: int, *, required: bool = True) -> None:
    value = self.present(field, required)
    if value is not _MISSING and not (_is_int(value) and value >= lo):
      self.bad(field, value, "must be a positive integer" if lo == 1 else f"must be an integer >= {lo}")

  def real_in(self, field: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
              required: bool = True, text: str | None = None) -> None:
    value = self.present(field, required)
    if value is _MISSING:
      return
    ok = _is_real(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
      if text is None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        text = f"must be a finite number in {left}{lo:g}, {hi:g}{right}"
      self.bad(field, value, text)

  def one_of(self, field: str, choices: Iterable[str], *, required: bool = True) -> None:
    value = self.present(field, required)
    choices = tuple(choices)
    if value is not _MISSING and (not isinstance(value, str) or value not in choices):
      self.bad(field, value, f"must be one of {', '.join(choices)}")

  def dtype(self, field: str, *, required: bool = False) -> None:
    self.one_of(field, sorted(DTYPES), required=required)


def _check_train(c: _Checker, section: str, *, with_captions: bool) -> None:
  """A `train`-like section (train, ae_train): what the loop, the optimizer and the EMA read."""
  for field in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    c.int_at_least(f"{section}.{field}", 1, required=field != "keep_checkpoints")
  for field in ("warmup_steps", "sample_every"):
    c.int_at_least(f"{section}.{field}", 0, required=False)
  c.real_in(f"{section}.learning_rate", 0.0, math.inf, lo_open=True, hi_open=True,
            text="must be a finite number > 0")
  c.real_in(f"{section}.ema_decay", 0.0, 1.0, hi_open=True, required=False,
            text="must be a number in [0, 1) (0: no EMA)")
  c.one_of(f"{section}.optimizer", OPTIMIZERS)
  c.one_of(f"{section}.schedule", SCHEDULES, required=False)
  for field in ("weight_decay", "grad_clip"):
    c.real_in(f"{section}.{field}", 0.0, math.inf, hi_open=True, required=False,
              text="must be a finite number >= 0 (0: off)")
  for field in ("adam_b1", "adam_b2"):
    c.real_in(f"{section}.{field}", 0.0, 1.0, hi_open=True, required=False)
  c.real_in(f"{section}.adam_eps", 0.0, 1.0, lo_open=True, required=False, text="must be a number in (0, 1]")
  c.int_at_least(f"{section}.grad_accum_steps", 1, required=False)
  accum, batch = c.get(f"{section}.grad_accum_steps"), c.get(f"{section}.batch_size")
  if _is_int(accum) and _is_int(batch) and accum >= 1 and batch >= 1 and batch % accum:
    c.bad(f"{section}.grad_accum_steps", accum, f"must divide {section}.batch_size={batch} (microbatches of "
          f"batch_size / grad_accum_steps examples)")
  if with_captions:
    c.real_in(f"{section}.caption_dropout", 0.0, 1.0, required=False)
  prompts = c.get(f"{section}.sample_prompts")
  if prompts is not _MISSING and prompts is not None and not (
      isinstance(prompts, (tuple, list)) and all(isinstance(p, str) and p.strip() for p in prompts)):
    c.bad(f"{section}.sample_prompts", prompts, "must be a tuple of non-empty prompts, or () for the held-out shapes "
          "prompts")
  profile, steps = c.get(f"{section}.profile_steps"), c.get(f"{section}.num_steps")
  if profile not in (_MISSING, None, (), []) and not (  # a config.json gives lists
      isinstance(profile, (tuple, list)) and len(profile) == 2 and all(_is_int(s) for s in profile)
      and 1 <= profile[0] <= profile[1] and (not _is_int(steps) or profile[1] <= steps)):
    c.bad(f"{section}.profile_steps", profile, f"must be () or (first, last) with 1 <= first <= last <= "
          f"{section}.num_steps, e.g. (11, 13)")


def _check_data(c: _Checker) -> None:
  source = c.present("data.source", True)
  if source is not _MISSING:
    if not isinstance(source, str) or not (source == "shapes" or source.startswith(
        ("folder:", "arrayrecord:", "webdataset:", "tfds:", "cache:"))):
      c.bad("data.source", source, f"must be {DATA_SOURCES}" + (bare_folder_hint(source) if isinstance(source, str)
                                                                  else ""))
    elif problem := url_path_problem(source.partition(":")[2]):
      c.bad("data.source", source, f"names a folder that {problem} (tfds: sets read gs:// themselves: "
            f"data.tfds_data_dir)")
    elif source.startswith(("folder:", "arrayrecord:")):
      kind, _, path = source.partition(":")
      if not path:
        c.bad("data.source", source, f"names no folder: write {kind}:/path/to/dir")
      elif not os.path.isdir(os.path.expanduser(path)):
        c.bad("data.source", source, f"folder {path!r} does not exist (must be {DATA_SOURCES})")
    elif source.startswith("webdataset:"):
      pattern = source[len("webdataset:"):]
      matches = webdataset_matches(pattern) if pattern else []
      if not matches:
        c.bad("data.source", source, "matches no file: write webdataset:/path/to/shards/*.tar or {00000..00099}.tar")
      elif not any(os.path.isfile(m) for m in matches):
        c.bad("data.source", source, f"matches only folders: name the shards in them, e.g. "
              f"webdataset:{os.path.join(pattern, '*.tar')}")
    elif source == "tfds:" or source.startswith("tfds::"):
      c.bad("data.source", source, "names no data set: write tfds:NAME or tfds:NAME:SPLIT")
    elif source.startswith("tfds:") and (missing := extras.missing_package("tensorflow_datasets", "a tfds: source")):
      c.bad("data.source", source, missing)
    elif source.startswith("cache:") and not os.path.isdir(os.path.expanduser(source[len("cache:"):])):
      c.bad("data.source", source, "names no cache folder: write one with python -m sanajax.data.cache --dst=DIR")
  c.one_of("data.buckets", BUCKET_KINDS, required=False)
  c.int_at_least("data.resolution", 1)
  c.int_at_least("data.num_workers", 0, required=False)
  c.int_at_least("data.latent_cache", 0, required=False)
  c.real_in("data.max_image_megapixels", 0.0, math.inf, lo_open=True, hi_open=True, required=False,
            text="must be a finite number > 0 (megapixels; larger images are skipped and named)")


def _check_mesh(c: _Checker) -> None:
  mesh = c.get("mesh")
  if mesh is _MISSING or mesh is None:
    return
  for name in MESH_AXES:
    value = c.get(f"mesh.{name}")
    if value is not _MISSING and not (_is_int(value) and (value >= 1 or value == -1)):
      c.bad(f"mesh.{name}", value, "must be an integer >= 1, or -1 (the devices the other axes leave)")
  cpu = c.get("mesh.cpu_devices")
  if cpu is not _MISSING and not (_is_int(cpu) and cpu >= 0):
    c.bad("mesh.cpu_devices", cpu, "must be an integer >= 0 (0: JAX's one CPU device)")


def _check_sample_and_eval(c: _Checker) -> None:
  c.one_of("sample.sampler", samplers.SAMPLERS)
  c.int_at_least("sample.steps", 1)
  c.real_in("sample.cfg", -math.inf, math.inf, text="must be a finite number")
  interval = c.get("sample.cfg_interval")
  if interval not in (_MISSING, None):
    ok = (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_is_real(v) for v in interval)
          and 0.0 <= interval[0] <= interval[1] <= 1.0)
    if not ok:
      c.bad("sample.cfg_interval", interval, "must be None (guidance at every step) or (LO, HI) with 0 <= LO <= HI <= 1")
  c.int_at_least("eval.num_prompts", 0, required=False)  # 0: no evaluation after training.
  c.int_at_least("eval.euler_steps", 0, required=False)
  c.real_in("eval.restoration_t0", 0.0, 1.0, hi_open=True, required=False)


def _check_diffusion(c: _Checker) -> None:
  c.one_of("diffusion.weighting", flow.WEIGHTINGS, required=False)
  for field in ("flow_shift", "alt_shift", "logit_std", "mode_scale"):
    c.real_in(f"diffusion.{field}", 0.0, math.inf, lo_open=True, hi_open=True, required=False,
              text="must be a finite number > 0")
  c.real_in("diffusion.alt_shift_fraction", 0.0, 1.0, required=False)
  shift = c.get("diffusion.resolution_shift")
  if shift is not _MISSING and not isinstance(shift, bool):
    c.bad("diffusion.resolution_shift", shift, "must be True (flow shift per bucket / sampled size) or False")


def _check_model(c: _Checker, kind: str) -> None:
  c.int_at_least("model.patch_size", 1)
  name = c.get("model.name")
  if name is not _MISSING and name not in BACKBONES:
    c.bad("model.name", name, f"must be one of {', '.join(BACKBONES)}")
  if name == "mmdit":
    _check_mmdit(c, kind)
  for field in ("depth", "hidden_size"):
    c.int_at_least(f"model.{field}", 1, required=False)
  c.dtype("model.dtype")
  remat = c.get("model.remat")
  if remat not in (_MISSING, "none"):
    try:
      remat_policy(remat)
    except (ValueError, TypeError):
      c.bad("model.remat", remat, "must be 'none', 'full' or a jax.checkpoint_policies name (e.g. 'dots_saveable')")
  scan = c.get("model.scan_layers")
  if scan is not _MISSING and not isinstance(scan, bool):
    c.bad("model.scan_layers", scan, "must be True or False")
  if scan is True and name == "mmdit":
    c.bad("model.scan_layers", scan, "is supported by the SANA DiT only; set it False for model.name='mmdit'")
  c.int_at_least("text.max_length", 2, required=False)
  if missing := missing_tokenizer_package(c.get("text.kind")):
    c.problems.append(missing.rstrip("."))
  c.dtype("text.dtype")
  probs = c.get("text.encoder_dropout")  # SD3's per-encoder caption dropout: one probability or (CLIP-L, bigG, T5)
  if probs is not _MISSING and not (_is_real(probs) and 0 <= probs <= 1) and not (
      isinstance(probs, (tuple, list)) and len(probs) == 3 and all(_is_real(p) and 0 <= p <= 1 for p in probs)):
    c.bad("text.encoder_dropout", probs, "must be a probability in [0, 1] or three of them (CLIP-L, bigG, T5)")
  if kind == "sprint" and c.get("model.guidance_embeds") is not True:
    c.bad("model.guidance_embeds", c.get("model.guidance_embeds"), "must be True for a Sprint student")


def _check_mmdit(c: _Checker, kind: str) -> None:
  """An MM-DiT's fields (sanajax.models.mmdit; names as diffusers' SD3Transformer2DModel)."""
  for field in ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                "caption_projection_dim", "pooled_projection_dim", "in_channels"):
    c.int_at_least(f"model.{field}", 1)
  c.one_of("model.joint_attention", JOINT_ATTENTION_KINDS, required=False)
  c.one_of("model.pooled_text", POOLED_TEXT, required=False)
  heads, dim = c.get("model.num_attention_heads"), c.get("model.attention_head_dim")
  proj = c.get("model.caption_projection_dim")
  if _is_int(heads) and _is_int(dim) and _is_int(proj) and proj != heads * dim:
    c.bad("model.caption_projection_dim", proj, f"must equal num_attention_heads x attention_head_dim = {heads * dim}")
  joint, pooled = c.get("model.joint_attention_dim"), c.get("model.pooled_projection_dim")
  masked_mean = c.get("model.pooled_text") in (_MISSING, "masked_mean")  # "clip": SD3's pooled CLIP pair
  if masked_mean and _is_int(joint) and _is_int(pooled) and pooled != joint:
    c.bad("model.pooled_projection_dim", pooled, f"must equal model.joint_attention_dim={joint} (the pooled text is "
          "the masked mean of the encoder states)")
  text = c.get("text.hidden_size")
  if _is_int(joint) and _is_int(text) and joint != text:
    c.bad("model.joint_attention_dim", joint, f"must equal the text encoder's width text.hidden_size={text}")
  if kind == "sprint" and c.get("model.pooled_text") == "clip":
    # The Sprint trainer embeds prompts with one text encoder (its states and their masked mean); SD3's
    # CLIP-L + bigG + T5 stack gives a pooled vector it does not yet carry through sCM and LADD.
    c.bad("model.pooled_text", "clip", "Sprint distils single-encoder MM-DiTs only: use a teacher trained with "
          "model.pooled_text='masked_mean' (configs/mmdit_tiny.py)")


def _check_resolution(c: _Checker, resolved: Any, kind: str) -> None:
  """data.resolution against the AE's downsampling (x the DiT's patch size)."""
  res = c.get("data.resolution")
  if not _is_int(res) or res < 1:
    return  # already reported
  try:
    down = ae_downsample(resolved)
  except (ValueError, TypeError, KeyError, AttributeError) as e:  # a bad ae section: say so, once
    c.problems.append(f"ae: {e}")
    return
  patch = c.get("model.patch_size") if kind != "ae" else 1
  if not _is_int(patch) or patch < 1:
    return
  if res % (down * patch):
    what = f"the AE downsampling {down}" + (f" x model.patch_size {patch}" if kind != "ae" else "")
    c.bad("data.resolution", res, f"must be a multiple of {what} = {down * patch}")


def _check_distill(c: _Checker) -> None:
  teacher = c.present("teacher_workdir", True)
  if teacher is not _MISSING:
    if not teacher or not isinstance(teacher, str):
      c.bad("teacher_workdir", teacher, "must be the workdir of a trained teacher (python -m sanajax.train)")
    elif not os.path.isdir(teacher):
      c.bad("teacher_workdir", teacher, "is not a folder: it must be the workdir of a trained teacher")
  ids = c.present("distill.head_block_ids", True)
  depth_field = "num_layers" if c.get("model.name") == "mmdit" else "depth"
  depth = c.get(f"model.{depth_field}")
  if ids is not _MISSING:
    ok = isinstance(ids, (list, tuple)) and len(ids) > 0 and all(_is_int(i) and i >= 0 for i in ids)
    ok = ok and len(set(ids)) == len(ids) and (not _is_int(depth) or max(ids) < depth)
    if not ok:
      bound = f" < model.{depth_field}={depth}" if _is_int(depth) else ""
      c.bad("distill.head_block_ids", ids, f"must be a non-empty tuple of distinct block indices >= 0{bound}")
  for field in ("scm_lambda", "adv_lambda", "disc_learning_rate", "tangent_norm_constant"):
    c.real_in(f"distill.{field}", 0.0, math.inf, hi_open=True, required=field.endswith("lambda"),
              text="must be a finite number >= 0")
  scm_l, adv_l = c.get("distill.scm_lambda"), c.get("distill.adv_lambda")
  if _is_real(scm_l) and _is_real(adv_l) and scm_l == 0 and adv_l == 0:
    c.problems.append("distill.scm_lambda=0 and distill.adv_lambda=0: at least one must be > 0")
  for field in ("sigma_data", "logit_std", "logit_std_discriminator"):
    c.real_in(f"distill.{field}", 0.0, math.inf, lo_open=True, hi_open=True, required=False,
              text="must be a finite number > 0")
  c.real_in("distill.largest_timestep", 0.0, math.pi / 2 + 1e-4, lo_open=True, required=False,
            text="must be in (0, pi/2] (TrigFlow time)")
  c.real_in("distill.largest_timestep_prob", 0.0, 1.0, required=False)
  c.int_at_least("distill.tangent_warmup_steps", 0, required=False)
  scales = c.get("distill.cfg_scales")
  if scales is not _MISSING and not (isinstance(scales, (list, tuple)) and scales and all(map(_is_real, scales))):
    c.bad("distill.cfg_scales", scales, "must be a non-empty tuple of finite numbers")
  c.dtype("distill.teacher_dtype")


def _check_batches(c: _Checker, resolved: Any, kind: str) -> None:
  """The mesh against the devices, and each global batch against the processes and batch shards."""
  try:
    plan = Plan.from_config(resolved)
  except (ValueError, TypeError) as e:
    c.problems.append(str(e).rstrip("."))  # mesh.mesh_shape names config.mesh and the device count
    return
  sections = ("train",) + (("ae_train",) if kind == "dit" and c.get("ae_train") is not _MISSING else ())
  for section in sections:
    batch = c.get(f"{section}.batch_size")
    if not _is_int(batch) or batch < 1:
      continue  # already reported
    try:
      host_batch_size(plan, batch)
    except ValueError as e:
      why = str(e).removeprefix(f"train.batch_size={batch} ")
      c.problems.append(f"{section}.batch_size={batch}: {why}")


def _check_controlnet(c: _Checker) -> None:
  """A ControlNet run (configs/controlnet_tiny.py; docs/controlnet.md): its section and what it needs of the base."""
  depth = c.get("model.depth")
  num_layers = c.present("controlnet.num_layers", True)
  if num_layers is not _MISSING and not (_is_int(num_layers) and _is_int(depth) and 1 <= num_layers < depth):
    c.bad("controlnet.num_layers", num_layers, f"must be an integer in [1, model.depth - 1 = {_show(depth)} - 1] "
          f"(residual k is added after base block k + 1)")
  c.one_of("controlnet.condition", ("canny",))
  c.real_in("controlnet.canny_low", 0.0, 1020.0, required=False)
  c.real_in("controlnet.canny_high", 0.0, 1020.0, required=False)
  base = c.present("controlnet.base_workdir", True)
  if base is not _MISSING and not (isinstance(base, str) and os.path.isdir(base)):
    c.bad("controlnet.base_workdir", base, "must be the trained base DiT's workdir (configs/controlnet_tiny.py:DIR)")
  if c.get("model.guidance_embeds") not in (_MISSING, False) or c.get("model.qk_norm") not in (_MISSING, False):
    c.bad("model.guidance_embeds", c.get("model.guidance_embeds"), "a ControlNet is trained on a plain DiT (the "
          "Sprint student's teacher), not on a student")
  cache = c.get("data.latent_cache")
  if cache not in (_MISSING, 0, None):
    c.bad("data.latent_cache", cache, "must be 0 for a ControlNet run (the condition is computed from the images)")


def _check_lora(c: _Checker) -> None:
  """config.lora (configs/lora.py, docs/lora.md): PEFT LoraConfig's fields, the base model, and the target
  modules against the model's Dense layers (abstract shapes only: nothing is allocated)."""
  if c.get("lora") is _MISSING:
    return
  c.int_at_least("lora.r", 1)
  c.real_in("lora.lora_alpha", 0.0, math.inf, lo_open=True, text="must be a finite number > 0")
  c.real_in("lora.lora_dropout", 0.0, 1.0, hi_open=True)
  c.one_of("lora.base_dtype", ("float32", "bfloat16", "float16"), required=False)
  base = c.get("lora.base")
  if not isinstance(base, str) or not os.path.isdir(base):
    c.bad("lora.base", base, "must be the base model's directory (--config=configs/lora.py:WORKDIR)")
  if c.get("init_from") not in (_MISSING, "", None):
    c.bad("init_from", c.get("init_from"), "must be empty in a LoRA run (the base is lora.base)")
  if c.get("model.scan_layers") is True:
    c.bad("model.scan_layers", True, "LoRA adapts each block's own layers: set it to False")
  if c.get("train.sample_every") not in (_MISSING, 0, None):
    c.bad("train.sample_every", c.get("train.sample_every"), "must be 0 in a LoRA run (the grid reads full DiT "
          "weights; the adapters are sampled with `python -m sanajax.sample --workdir=LORA_WORKDIR`)")
  if any(p.startswith(("model.", "lora.")) for p in c.problems):
    return  # the model cannot be built, or the targets are already reported
  try:
    like = abstract_params(build_backbone(c.config.model), *init_args(c.config.model))
    lora_target_paths(like, c.get("lora.target_modules"))
  except ValueError as e:
    c.problems.append(str(e).rstrip("."))


def validate_model_fields(config: Any) -> None:
  """Raises one ConfigError listing every bad field `sanajax.info` reads: the model, data.resolution (with its
  presets and the AE's downsampling) and the mesh's axes. Not the data source, the teacher or the mesh against
  this machine's devices: info describes a config for any machine and any plan."""
  c = _Checker(config)
  c.int_at_least("data.resolution", 1)
  try:
    resolved = apply_resolution(copy.deepcopy(config))
  except (ValueError, KeyError) as e:
    c.problems.append(f"data.resolution={_show(c.get('data.resolution'))}: {e}")
    resolved = config
  c.config = resolved
  _check_mesh(c)
  _check_model(c, "dit")
  _check_resolution(c, resolved, "dit")
  if c.problems:
    raise ConfigError(c.problems)


def validate_config(config: Any, kind: str) -> None:
  """Raises one ConfigError listing every bad field of `config` for a run of `kind`.

  kind: "dit" (sanajax.train; also checks the `ae_train` section of the AE it trains first), "ae"
  (sanajax.train_ae) or "sprint" (sanajax.distill_sprint). Reads the config only: the resolution
  presets are applied to a copy, the mesh is built against this process's devices (so it runs
  after jax.distributed is initialised, as the CLIs do), and nothing is written.
  """
  if kind not in KINDS:
    raise ValueError(f"validate_config kind={kind!r}; expected one of {KINDS}.")
  c = _Checker(config)
  if not _is_int(c.get("seed")):
    c.bad("seed", c.get("seed"), "must be an integer")
  for field in PATH_FIELDS:
    if problem := url_path_problem(c.get(field)):
      c.bad(field, c.get(field), problem)
  try:
    resolved = apply_resolution(copy.deepcopy(config))
  except (ValueError, KeyError) as e:  # no preset for this resolution, or a bad presets table
    c.problems.append(f"data.resolution={_show(c.get('data.resolution'))}: {e}")
    resolved = config
  c.config = resolved  # presets may set train.batch_size, diffusion.flow_shift...: check what will run.
  _check_train(c, "train", with_captions=kind != "ae")
  _check_data(c)
  _check_mesh(c)
  c.dtype("ae.dtype")
  if kind != "ae":
    _check_model(c, kind)
    _check_sample_and_eval(c)
    _check_diffusion(c)
  if kind == "dit" and c.get("ae_train") is not _MISSING:
    _check_train(c, "ae_train", with_captions=False)
  if kind == "sprint":
    _check_distill(c)
  if kind == "dit":
    _check_lora(c)
  if kind == "dit" and c.get("controlnet") is not _MISSING:
    _check_controlnet(c)
  _check_resolution(c, resolved, kind)
  if not any(p.startswith("mesh") for p in c.problems):
    _check_batches(c, resolved, kind)
  if c.problems:
    raise ConfigError(c.problems)
