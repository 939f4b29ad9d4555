"""Text-to-image sampling from a training workdir.

    python -m sanajax.sample --workdir=DIR --prompts_file=F --out=OUT \
        [--sampler=flow_dpm|flow_euler] [--steps=20] [--cfg=4.5] [--cfg_interval=0.5,1|none] [--seed=0]
    python -m sanajax.sample --workdir=DIR --prompt="a red circle" --out=OUT
    python -m sanajax.sample --workdir=SPRINT_DIR --prompt="a red circle" --out=OUT --sampler=scm --steps=2
    python -m sanajax.sample --workdir=DIR --prompts_file=F --out=OUT --mesh=fsdp=8   # sharded (README "Scaling")

`--sampler=scm` is SANA-Sprint's sCM sampler (1, 2 or 4 steps on the TrigFlow grids [1.5708, 0],
[1.5708, 1.3, 0], linspace(1.5708, 0, 5)); with a Sprint student (model.guidance_embeds) `--cfg`
is the guidance value the student embeds (Sprint: 4.5), not a second model pass.

Writes OUT/00000.png, 00001.png, ... (one per prompt, in order) and OUT/grid.png, using
the EMA weights of the latest checkpoint in DIR.
"""
from __future__ import annotations

import os

from absl import app, flags

from sanajax.eval.geneval_lite import read_prompts_file
from sanajax.generation import Generator, write_images
from sanajax.parallel import MESH_AXES, Plan, make_mesh
from sanajax.training.setup import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line (a \"<TAB>category\" "
                                     "suffix, as in GenEval-lite prompts files, is dropped).")
_PROMPT = flags.DEFINE_string("prompt", None, "A single prompt (instead of --prompts_file).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the PNGs.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["flow_dpm", "flow_euler", "scm"],
                             "Default: the config's sample.sampler. scm: SANA-Sprint's 1-4 step sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "Default: the config's sample.steps.")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (a Sprint student's embedded guidance "
                          "value). Default: the config's sample.cfg.")
_CFG_INTERVAL = flags.DEFINE_string("cfg_interval", None, "Flow times 'LO,HI' at which CFG applies (flow "
                                    "samplers; 'none': every step). Default: the config's sample.cfg_interval.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per sampling call.")
_MESH = flags.DEFINE_string("mesh", "", "Sharding plan for sampling, e.g. 'fsdp=8' or 'data=2,tensor=4' (mesh axes "
                            "data, fsdp, sequence, tensor; -1: the rest of the devices). Default: one device.")


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=4,tensor=2' -> {"fsdp": 4, "tensor": 2} (checked against the mesh axes)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in MESH_AXES or not value.lstrip("-").isdigit():
      raise app.UsageError(f"--mesh part {part!r}: expected AXIS=SIZE with AXIS one of {MESH_AXES}.")
    out[name] = int(value)
  return out


def parse_cfg_interval(text: str) -> tuple[float, float] | None:
  """'0.5,1' -> (0.5, 1.0); 'none' -> None (guidance at every step)."""
  if text.strip().lower() == "none":
    return None
  parts = text.split(",")
  try:
    lo, hi = (float(p) for p in parts)
  except ValueError:
    raise app.UsageError(f"--cfg_interval={text!r}: expected 'LO,HI' flow times (e.g. '0.5,1') or 'none'.") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise app.UsageError(f"--cfg_interval={text!r}: need 0 <= LO <= HI <= 1.")
  return lo, hi


def read_prompts(prompts_file: str | None, prompt: str | None) -> list[str]:
  if (prompts_file is None) == (prompt is None):
    raise app.UsageError("Give exactly one of --prompts_file or --prompt.")
  if prompt is not None:
    return [prompt]
  if not os.path.exists(prompts_file):
    raise app.UsageError(f"--prompts_file {prompts_file!r} does not exist.")
  # The GenEval-lite format ("prompt<TAB>category" lines, e.g. a run's samples/prompts.txt) is read
  # the way the evaluator reads it: the category is for scoring, never part of the prompt.
  try:
    prompts, _ = read_prompts_file(prompts_file)
  except ValueError as e:
    raise app.UsageError(f"--prompts_file: {e}") from None
  if not prompts:
    raise app.UsageError(f"--prompts_file {prompts_file!r} holds no prompts.")
  return prompts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required.")
  prompts = read_prompts(_PROMPTS_FILE.value, _PROMPT.value)
  interval = None if _CFG_INTERVAL.value is None else parse_cfg_interval(_CFG_INTERVAL.value)
  try:
    mesh = parse_mesh(_MESH.value)
    plan = Plan(make_mesh(mesh)) if mesh else None
    generator = Generator.from_workdir(_WORKDIR.value, plan=plan)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if _CFG_INTERVAL.value is not None:
    generator.cfg_interval = interval
  cfg = generator.config.sample
  images = generator.generate(prompts, sampler=_SAMPLER.value or cfg.sampler, steps=_STEPS.value or cfg.steps,
                              cfg=cfg.cfg if _CFG.value is None else _CFG.value, seed=_SEED.value,
                              batch_size=_BATCH.value)
  write_images(images, _OUT.value)
  print(f"Wrote {len(images)} images and grid.png to {_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
