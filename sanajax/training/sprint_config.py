"""A Sprint student config for a trained teacher workdir (notebooks, experiments.sprint_ablation).

    teacher = check_teacher("workdirs/tiny")
    config = student_config(teacher, "workdirs/tiny", num_steps=1500, overrides={"distill.adv_lambda": 0.0})
    sprint.distill(config, "workdirs/sprint_tiny")
"""
from __future__ import annotations

import os

import ml_collections

from sanajax import config_utils
from sanajax.training.sprint import (  # spread_blocks: re-exported (sprint_config.spread_blocks)
  SPRINT_MODEL_FIELDS,
  fit_head_blocks,
  spread_blocks,  # noqa: F401
  student_model_section,
)
from sanajax.workdir.checkpoint import latest_workdir_step
from sanajax.workdir.files import ae_workdir, checkpoint_dir, load_model_workdir_config

# Sections of the teacher's config.json a student must share (sprint.check_student_config).
TEACHER_SECTIONS = ("text", "ae", "diffusion")


def check_teacher(teacher_workdir: str) -> ml_collections.ConfigDict:
  """The teacher's config; FileNotFoundError / ValueError saying what is wrong for a directory that
  is not a trained teacher run."""
  config = load_model_workdir_config(teacher_workdir)
  if latest_workdir_step(teacher_workdir) is None:
    raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(teacher_workdir)}; train the teacher first "
                            f"(python -m sanajax.train --workdir={teacher_workdir}).")
  if config.get("model", {}).get("guidance_embeds", False):
    raise ValueError(f"{teacher_workdir} is a Sprint student (guidance_embeds), not a teacher.")
  return config


def student_config(teacher_config: ml_collections.ConfigDict, teacher_workdir: str, num_steps: int | None,
                   overrides: dict, base: str = "sprint_tiny") -> ml_collections.ConfigDict:
  """The Sprint config `base` (configs/sprint_tiny.py; or sprint_600m / sprint_1600m, whose distill and
  train sections are the reference's) with the teacher's architecture / text / data / AE, then
  `overrides` ({dotted field: value}); num_steps None keeps the config's train.num_steps."""
  config = config_utils.load_config(base)
  if "resolution_presets" in config and "resolution_presets" not in teacher_config:
    # A SANA-size config on a teacher without presets (tiny): the teacher's sections carry the values
    # the presets would derive, and its resolution has no row.
    del config["resolution_presets"]
  teacher = ml_collections.ConfigDict(teacher_config.to_dict())
  # The Sprint options stay the student config's; q/k norms follow the teacher (a phase-1 teacher
  # has them), unless an override changes them.
  config.model = student_model_section(config.model, teacher.model,
                                       tuple(f for f in SPRINT_MODEL_FIELDS if f != "qk_norm"))
  for section in TEACHER_SECTIONS:
    config[section] = teacher[section]
  config.ae.workdir = os.path.abspath(ae_workdir(teacher_config, teacher_workdir))
  config.data.source = teacher.data.source
  config.data.resolution = teacher.data.resolution
  config.seed = teacher.get("seed", config.seed)
  config.eval.num_prompts = teacher.eval.num_prompts
  config.teacher_workdir = os.path.abspath(teacher_workdir)
  if num_steps is not None:
    config.train.num_steps = int(num_steps)
  config.train.checkpoint_every = min(config.train.checkpoint_every, int(config.train.num_steps))
  fit_head_blocks(config)  # A shallower teacher than configs/tiny.py's 4 blocks.
  for key, value in overrides.items():
    config_utils.set_field(config, key, value)
  return config
