"""Distils a trained SANA teacher into a 1-4 step SANA-Sprint student (sCM + LADD).

    python -m sanajax.distill_sprint --config=configs/sprint_tiny.py \
        --config.teacher_workdir=workdirs/tiny --workdir=workdirs/sprint_tiny

Same workdir layout, resume, metrics/TensorBoard, progress bar and NaN guard as sanajax.train; a
killed run restarted with the same command resumes exactly. Sample the student with
`python -m sanajax.sample --workdir=WORKDIR --sampler=scm --steps=1|2|4`.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from sanajax.config_utils import record_overrides
from sanajax.training.setup import quiet_library_logs
from sanajax.training.sprint import distill

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sprint_tiny.py", "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default: workdirs/<config name>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  config = record_overrides(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"]))
  if not config.get("teacher_workdir"):
    raise app.UsageError("--config.teacher_workdir is required: the workdir of a trained teacher (sanajax.train).")
  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("workdirs", config_name)
  print(f"Workdir: {os.path.abspath(workdir)}", flush=True)
  try:
    distill(config, workdir)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
