"""Text-to-image sampling from a training workdir.

    python -m sanajax.sample --workdir=DIR --prompts_file=F --out=OUT \
        [--sampler=flow_dpm|flow_euler] [--steps=20] [--cfg=4.5] [--cfg_interval=0.5,1|none] [--seed=0]
    python -m sanajax.sample --workdir=DIR --prompt="a red circle" --out=OUT
    python -m sanajax.sample --workdir=DIR --prompt=... --out=OUT --height=768 --width=1344   # any bucket (docs/data.md)
    python -m sanajax.sample --workdir=DIR --lora=LORA_DIR[:0.8] [--lora=...] --prompt=... --out=OUT  # docs/lora.md
    python -m sanajax.sample --workdir=SPRINT_DIR --prompt="a red circle" --out=OUT --sampler=scm --steps=2
    python -m sanajax.sample --workdir=DIR --prompt="a red circle" --out=OUT --quantize=int8   # docs/quantization.md
    python -m sanajax.sample --workdir=DIR --prompts_file=F --out=OUT --config.mesh.fsdp=8   # sharded (README "Scaling")
    python -m sanajax.sample --workdir=CONTROLNET_DIR --control=edges.png [--control_scale=1] --prompt=... --out=OUT
    python -m sanajax.sample --workdir=SPRINT_DIR --controlnet=CONTROLNET_DIR --control=edges.png --sampler=scm ...

ControlNet (docs/controlnet.md): --workdir may be a ControlNet workdir (sanajax.train with
configs/controlnet_tiny.py), which samples its base DiT steered by it, or any DiT / Sprint workdir with
--controlnet=DIR (a ControlNet workdir or a diffusers SanaControlNetModel directory), e.g. the Sprint
student of the ControlNet's base (a ControlNet trained on the teacher, applied to the student). --control
is the condition image (an edge, depth or HED map, used as given); one of another size than the model's
resolution is resized to it, with a warning.

`--sampler=scm` is SANA-Sprint's sCM sampler (1, 2 or 4 steps on the TrigFlow grids [1.5708, 0],
[1.5708, 1.3, 0], linspace(1.5708, 0, 5)) for a Sprint student (a sanajax.distill_sprint workdir,
model.guidance_embeds); there `--cfg` is the guidance value the student embeds (Sprint: 4.5), not
a second model pass. `--config.mesh.*` is the sharding plan, spelt as for training (mesh axes data,
fsdp, sequence, tensor; -1: the rest of the devices; default: one device); multi-host with the
flags of sanajax.train.

The options are checked before any model loads (one line on stderr and exit code 2 for a
non-finite --cfg, --steps < 1, scm on a model that is not a Sprint student, an --out that cannot
be written); a prompt longer than the text encoder reads is sampled from its first tokens, with
a warning.

Writes OUT/00000.png, 00001.png, ... (one per prompt, in order) and OUT/grid.png, using
the EMA weights of the latest checkpoint in DIR.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import math
import os
import sys
import tempfile

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from sanajax import cli
from sanajax.data.buckets import check_sample_size
from sanajax.data.conditions import load_control_image
from sanajax.diffusion import samplers
from sanajax.eval.geneval_lite import read_prompts_file
from sanajax.generation import Generator, truncation_warnings, write_images
from sanajax.models.quantize import MODES as QUANTIZE_MODES
from sanajax.models.quantize import check_mode as check_quantize
from sanajax.models.text_encoder import TextEncoder
from sanajax.parallel import Plan, mesh_config
from sanajax.paths import url_path_problem
from sanajax.workdir.files import load_model_workdir_config, load_workdir_config
from sanajax.workdir.loaders import check_adapter_source, is_controlnet_workdir, load_controlnet

cli.define_flags("Training workdir (config.json + checkpoints).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line (a \"<TAB>category\" "
                                     "suffix, as in GenEval-lite prompts files, is dropped).")
_PROMPT = flags.DEFINE_string("prompt", None, "A single prompt (instead of --prompts_file).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the PNGs (created; must be writable).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS),
                             "Default: the config's sample.sampler. scm: SANA-Sprint's 1-4 step sampler "
                             "(Sprint students only).")
_STEPS = flags.DEFINE_integer("steps", None, "Model evaluations, >= 1. Default: the config's sample.steps.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale, finite (a Sprint student's embedded "
                          "guidance value). Default: the config's sample.cfg.")
_CFG_INTERVAL = flags.DEFINE_string("cfg_interval", None, "Flow times 'LO,HI' at which CFG applies (flow "
                                    "samplers; 'none': every step). Default: the config's sample.cfg_interval.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height in pixels (default: the config's data.resolution); "
                               "with --width any aspect-ratio bucket (docs/data.md#buckets).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width in pixels (default: the config's data.resolution).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per sampling call.")
_LORA = flags.DEFINE_multi_string("lora", [], "LoRA to apply, DIR[:SCALE] (default scale 1): a LoRA workdir or a "
                                  "directory holding pytorch_lora_weights.safetensors (diffusers / PEFT). "
                                  "Repeat to stack adapters; they are merged into the weights (docs/lora.md).")
_QUANTIZE = flags.DEFINE_string("quantize", "none", f"Post-training quantization of the DiT with qwix: one of "
                                 f"{', '.join(QUANTIZE_MODES)} (int8: weights; int8_dynamic: weights and "
                                 f"activations; fp8: GPUs of compute capability >= 8.9). docs/quantization.md.")
_CONTROL = flags.DEFINE_string("control", None, "ControlNet condition image (an edge / depth / HED map, used as given; "
                               "resized to the model's resolution if needed). Needs a ControlNet.")
_CONTROL_SCALE = flags.DEFINE_float("control_scale", 1.0, "ControlNet conditioning scale (SanaControlNetPipeline's "
                                    "controlnet_conditioning_scale; 0: the base alone).")
_CONTROLNET = flags.DEFINE_string("controlnet", None, "ControlNet to steer --workdir's model with: a ControlNet workdir "
                                  "or a diffusers SanaControlNetModel directory (default: --workdir itself when it is "
                                  "a ControlNet workdir).")
# Only the sharding plan is set from the command line (--config.mesh.fsdp=8, as for training); it is
# laid over the workdir's config, whose mesh was the training run's (sampling defaults to one device).
_CONFIG = cli.define_config_dict(ml_collections.ConfigDict({"mesh": mesh_config()}),
                                "Sampling overrides: --config.mesh.AXIS=SIZE.")


def parse_cfg_interval(text: str) -> tuple[float, float] | None:
  """'0.5,1' -> (0.5, 1.0); 'none' -> None (guidance at every step)."""
  if text.strip().lower() == "none":
    return None
  parts = text.split(",")
  try:
    lo, hi = (float(p) for p in parts)
  except ValueError:
    raise cli.UserError(f"--cfg_interval={text!r}: expected 'LO,HI' flow times (e.g. '0.5,1') or 'none'.") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise cli.UserError(f"--cfg_interval={text!r}: need 0 <= LO <= HI <= 1.")
  return lo, hi


def read_prompts(prompts_file: str | None, prompt: str | None) -> list[str]:
  if (prompts_file is None) == (prompt is None):
    raise cli.UserError("Give exactly one of --prompts_file or --prompt.")
  if prompt is not None:
    return [prompt]
  if not os.path.exists(prompts_file):
    raise cli.UserError(f"--prompts_file {prompts_file!r} does not exist.")
  # The GenEval-lite format ("prompt<TAB>category" lines, e.g. a run's samples/prompts.txt) is read
  # the way the evaluator reads it: the category is for scoring, never part of the prompt.
  try:
    prompts, _ = read_prompts_file(prompts_file)
  except ValueError as e:
    raise cli.UserError(f"--prompts_file: {e}") from None
  if not prompts:
    raise cli.UserError(f"--prompts_file {prompts_file!r} holds no prompts.")
  return prompts


def check_out_dir(out: str) -> None:
  """Creates `out` and writes a probe file in it, so an unwritable --out fails before sampling."""
  if problem := url_path_problem(out):
    raise cli.UserError(f"--out={out} {problem}.")
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".sanajax-write-test-"):
      pass
  except OSError as e:
    raise cli.UserError(f"--out={out!r} cannot be written ({e.strerror or e}); choose a folder you can write to.") \
        from e


def check_options(config: ml_collections.ConfigDict, sampler: str, steps: int, cfg: float, batch_size: int) -> None:
  """The sampling options against the workdir's config (config.json only: nothing has loaded yet).

  steps >= 1 (every sampler; scm's grids: 1, 2, 4 as released, any count works), a finite cfg,
  and scm only for a Sprint student: a plain flow model sampled with scm goes through the TrigFlow
  transform of its velocity (generation.sample_latents), which is what distillation starts from,
  not a few-step sampler; at 1-4 steps it gives blurred images, not the student's.
  """
  source = lambda flag, field: f"--{flag}" if flags.FLAGS[flag].present else f"sample.{field} of the workdir's config"
  if not isinstance(steps, int) or steps < 1:
    raise cli.UserError(f"{source('steps', 'steps')}={steps}: the number of sampling steps must be >= 1.")
  if not math.isfinite(cfg):
    raise cli.UserError(f"{source('cfg', 'cfg')}={cfg}: the guidance scale must be a finite number (e.g. 4.5).")
  if batch_size < 1:
    raise cli.UserError(f"--batch_size={batch_size}: must be >= 1.")
  if sampler == "scm" and not config.model.get("guidance_embeds", False):
    raise cli.UserError(
        f"{source('sampler', 'sampler')}=scm needs a SANA-Sprint student (model.guidance_embeds); this workdir holds a "
        f"flow-matching model: sample it with --sampler=flow_dpm or flow_euler, or distil it first "
        f"(python -m sanajax.distill_sprint --config.teacher_workdir=WORKDIR).")


def sampling_plan(workdir_config: ml_collections.ConfigDict) -> Plan:
  """The --config.mesh.* plan (default one device) with the workdir's logical-axis rules (unless
  --config.mesh.rules is given): the mesh of training is not reused, sampling may run elsewhere."""
  mesh = ml_collections.ConfigDict(_CONFIG.value.mesh.to_dict())
  overridden = config_flags.get_override_values(flags.FLAGS["config"])
  if "mesh.rules" not in overridden and "rules" in workdir_config.get("mesh", {}):
    mesh.rules = workdir_config.mesh.rules
  try:
    return Plan.from_config({"mesh": mesh})
  except (ValueError, TypeError) as e:
    raise cli.UserError(f"--config.mesh: {e}") from e


def resolve_controlnet(workdir: str) -> tuple[str, str | None]:
  """(the DiT / Sprint workdir to sample, the ControlNet or None) from --workdir, --controlnet, --control;
  every inconsistency is a one-line user error before anything loads."""
  controlnet = _CONTROLNET.value
  if is_controlnet_workdir(workdir):
    if controlnet:
      raise cli.UserError(f"--workdir={workdir!r} is a ControlNet workdir: give the model to steer as --workdir and "
                          f"the ControlNet as --controlnet, or drop --controlnet.")
    controlnet, workdir = workdir, load_workdir_config(workdir).controlnet.base_workdir
  if controlnet and not _CONTROL.value:
    raise cli.UserError("A ControlNet needs its condition: --control=IMAGE (e.g. an edge map).")
  if _CONTROL.value and not controlnet:
    raise cli.UserError(f"--control needs a ControlNet: --controlnet=DIR, or a ControlNet workdir as --workdir "
                        f"({workdir!r} is a plain model workdir).")
  if not math.isfinite(_CONTROL_SCALE.value):
    raise cli.UserError(f"--control_scale={_CONTROL_SCALE.value}: must be a finite number (e.g. 1.0).")
  return workdir, controlnet


def parse_loras(values: list[str]) -> tuple[tuple[str, float], ...]:
  """--lora=DIR[:SCALE] values -> ((path, scale), ...) (scale 1 by default), each path checked to exist."""
  out = []
  for text in values:
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
      try:
        path, scale = head, float(tail)
      except ValueError:
        path, scale = text, 1.0  # a ':' inside the path itself
    if not math.isfinite(scale):
      raise cli.UserError(f"--lora={text!r}: the scale must be a finite number (DIR[:SCALE], e.g. {path}:0.8).")
    if not os.path.exists(path):
      raise cli.UserError(f"--lora={text!r}: {path!r} does not exist (a LoRA workdir, or a directory holding "
                          f"pytorch_lora_weights.safetensors; DIR[:SCALE]).")
    check_adapter_source(path)  # before the model loads: a model's workdir given as the LoRA is one line
    out.append((path, scale))
  return tuple(out)


def main(argv):
  del argv  # cli.run refuses positional arguments.
  if not flags.FLAGS.workdir or not _OUT.value:
    raise cli.UserError("--workdir and --out are required.")
  workdir, controlnet_dir = resolve_controlnet(flags.FLAGS.workdir)
  prompts = read_prompts(_PROMPTS_FILE.value, _PROMPT.value)
  interval = None if _CFG_INTERVAL.value is None else parse_cfg_interval(_CFG_INTERVAL.value)
  config = load_model_workdir_config(workdir)  # config.json only: the options are checked before any model loads.
  sample = config.sample
  sampler = _SAMPLER.value or sample.sampler
  steps = sample.steps if _STEPS.value is None else _STEPS.value
  cfg = float(sample.cfg if _CFG.value is None else _CFG.value)
  check_options(config, sampler, steps, cfg, _BATCH.value)
  loras = parse_loras(_LORA.value)
  control = None
  if controlnet_dir:
    try:
      control, note = load_control_image(_CONTROL.value, int(config.data.resolution))
    except ValueError as e:
      raise cli.UserError(str(e)) from None
    if note:
      print(f"Warning: {note}", file=sys.stderr, flush=True)
  try:
    check_quantize(_QUANTIZE.value, "--quantize", check_platform=True)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  try:  # before any model loads: a size the model cannot take names the nearest ones it can.
    check_sample_size(config, _HEIGHT.value or config.data.resolution, _WIDTH.value or config.data.resolution)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  check_out_dir(_OUT.value)
  plan = sampling_plan(config)
  generator = Generator.from_workdir(workdir, plan=plan, quantize=_QUANTIZE.value, loras=loras)
  # SANA's Gemma-2 encoder (one tokenizer, a BOS and a CHI prompt); SD3's three tokenizers are not checked yet.
  long_prompts = truncation_warnings(generator.text, prompts) if isinstance(generator.text, TextEncoder) else []
  for line in long_prompts:
    print(line, file=sys.stderr, flush=True)
  if _CFG_INTERVAL.value is not None:
    generator.cfg_interval = interval
  if controlnet_dir:
    model, params, base = load_controlnet(controlnet_dir)
    if base and os.path.abspath(base) != os.path.abspath(workdir):
      print(f"Note: the ControlNet was trained on {base}; it steers {workdir} here (e.g. that base's Sprint "
            f"student: docs/controlnet.md#sprint).", file=sys.stderr, flush=True)
    generator.attach_controlnet(model, params)
    generator.set_control(control[None], _CONTROL_SCALE.value)
  images = generator.generate(prompts, sampler=sampler, steps=steps, cfg=cfg, seed=_SEED.value,
                              height=_HEIGHT.value, width=_WIDTH.value, batch_size=_BATCH.value,
                              progress="Sampling" if len(prompts) > _BATCH.value else None)  # a bar past one batch
  if jax.process_index() == 0:  # every process holds all images (Generator.generate); one writes them.
    write_images(images, _OUT.value)
    print(f"Wrote {len(images)} images and grid.png to {_OUT.value}", flush=True)


if __name__ == "__main__":
  cli.run(main)
