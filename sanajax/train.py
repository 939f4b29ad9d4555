"""Trains a SANA linear DiT with rectified flow.

    python -m sanajax.train --config=configs/tiny.py --workdir=/tmp/sanajax_tiny
    python -m sanajax.train --config=configs/sana_1600m.py --config.data.source=folder:/data/imgs ...

The tiny default trains its own AE first (WORKDIR/ae) when `config.ae.workdir` holds no
checkpoint, then the DiT, then writes WORKDIR/samples/ (a grid on held-out prompts) and
WORKDIR/geneval_lite.json. A killed run restarted with the same command resumes from its
last checkpoint and continues exactly as if it had not stopped.

Multi-host (README "Scaling", launch/*.sh): one process per host with --coordinator=HOST:PORT
--num_processes=N --process_id=I, or --distributed=auto under SLURM / on TPU pods.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from sanajax.config_utils import record_overrides
from sanajax.parallel import distributed
from sanajax.training.dit import train
from sanajax.training.setup import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go "
                               "(default: workdirs/<config name>).")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  distributed.initialize_from_flags()  # before any other JAX call; a no-op for single-process runs.
  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("workdirs", config_name)
  print(f"Workdir: {os.path.abspath(workdir)}", flush=True)
  train(record_overrides(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"])), workdir)


if __name__ == "__main__":
  app.run(main)
