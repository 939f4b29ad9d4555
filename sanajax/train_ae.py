"""Trains a DC-AE on images (the tiny one on the shapes data by default).

    python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir=/tmp/sanajax_ae

Writes WORKDIR/checkpoints (Orbax), WORKDIR/config.json, WORKDIR/metrics.jsonl and
WORKDIR/ae_info.json with the latent scaling factor (1 / std of the latents, SANA's
`scale_factor` convention) and the reconstruction PSNR on held-out shapes images.

`--config.mesh.*` picks a sharding plan as for the DiT (README "Scaling"), e.g.
--config.mesh.fsdp=-1; multi-host with --coordinator=HOST:PORT --num_processes=N --process_id=I
or --distributed=auto (launch/*.sh), as sanajax.train.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from sanajax.parallel import distributed
from sanajax.training.autoencoder import train_ae
from sanajax.training.setup import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dcae_tiny.py", "AE config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  distributed.initialize_from_flags()  # before any other JAX call; a no-op for single-process runs.
  workdir = _WORKDIR.value or os.path.join("workdirs", "dcae")
  train_ae(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)
