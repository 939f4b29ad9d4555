"""Distils a trained SANA teacher into a 1-4 step SANA-Sprint student (sCM + LADD).

    python -m sanajax.distill_sprint --config=configs/sprint_tiny.py \
        --config.teacher_workdir=workdirs/tiny --workdir=workdirs/sprint_tiny

Same workdir layout, resume, metrics/TensorBoard, progress bar and NaN guard as sanajax.train; a
killed run restarted with the same command resumes exactly. Multi-host as sanajax.train
(--coordinator=HOST:PORT --num_processes=N --process_id=I, or --distributed=auto). Sample the
student with `python -m sanajax.sample --workdir=WORKDIR --sampler=scm --steps=1|2|4`.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

from sanajax import cli
from sanajax.eval import after_training
from sanajax.training.sprint import distill

_CONFIG = cli.define_config_file("configs/sprint_tiny.py", "Config file.")
cli.define_flags("Where checkpoints and metrics go (default: workdirs/<config name>).")


def main(argv):
  del argv  # cli.run refuses positional arguments.
  config = cli.config_from_flags()
  if not config.get("teacher_workdir"):
    raise cli.UserError("--config.teacher_workdir is required: the workdir of a trained teacher (sanajax.train).")
  workdir = cli.workdir(default=cli.default_workdir())
  distill(config, workdir, evaluate=after_training.evaluate_sprint_run, make_sample_fn=after_training.make_grid_fn)
  cli.print_run_summary(workdir)


if __name__ == "__main__":
  cli.run(main)
