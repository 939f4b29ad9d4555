"""Trains a SANA linear DiT with rectified flow.

    python -m sanajax.train --config=configs/tiny.py --workdir=/tmp/sanajax_tiny
    python -m sanajax.train --config=configs/sana_1600m.py --config.data.source=folder:/data/imgs ...
    python -m sanajax.train --config=configs/controlnet_tiny.py:BASE_WORKDIR --workdir=DIR   # a ControlNet

The tiny default trains its own AE first (WORKDIR/ae) when `config.ae.workdir` holds no
checkpoint, then the DiT, then writes WORKDIR/samples/ (a grid on held-out prompts) and
WORKDIR/geneval_lite.json. A killed run restarted with the same command resumes from its
last checkpoint and continues exactly as if it had not stopped. The whole config is checked
first (sanajax.config_check): a bad field fails in seconds, with every bad field named.

Multi-host (README "Scaling", launch/*.sh): one process per host with --coordinator=HOST:PORT
--num_processes=N --process_id=I, or --distributed=auto under SLURM / on TPU pods.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

from sanajax import cli
from sanajax.eval import after_training, control_fidelity
from sanajax.training.controlnet import train_controlnet
from sanajax.training.dit import train

_CONFIG = cli.define_config_file("configs/tiny.py", "Config file.")
cli.define_flags("Where checkpoints, metrics and samples go (default: workdirs/<config name>).")


def main(argv):
  del argv  # cli.run refuses positional arguments.
  workdir = cli.workdir(default=cli.default_workdir())
  config = cli.config_from_flags()
  if "controlnet" in config:  # a ControlNet on a frozen base (configs/controlnet_tiny.py, docs/controlnet.md)
    train_controlnet(config, workdir, evaluate=control_fidelity.evaluate_controlnet_run)
  else:
    train(config, workdir, evaluate=after_training.evaluate_dit_run, make_sample_fn=after_training.make_grid_fn)
  cli.print_run_summary(workdir)


if __name__ == "__main__":
  cli.run(main)
