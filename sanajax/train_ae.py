"""Trains a DC-AE on images (the tiny one on the shapes data by default).

    python -m sanajax.train_ae --config=configs/dcae_tiny.py --workdir=/tmp/sanajax_ae

Writes WORKDIR/checkpoints (Orbax), WORKDIR/config.json, WORKDIR/metrics.jsonl and
WORKDIR/ae_info.json with the latent scaling factor (1 / std of the latents, SANA's
`scale_factor` convention) and the reconstruction PSNR on held-out shapes images.
Default workdir: workdirs/<config name> (workdirs/dcae_tiny).

`--config.mesh.*` picks a sharding plan as for the DiT (README "Scaling"), e.g.
--config.mesh.fsdp=-1; multi-host with --coordinator=HOST:PORT --num_processes=N --process_id=I
or --distributed=auto (launch/*.sh), as sanajax.train.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

from sanajax import cli
from sanajax.training.autoencoder import train_ae

_CONFIG = cli.define_config_file("configs/dcae_tiny.py", "AE config file.")
cli.define_flags("Where checkpoints and metrics go (default: workdirs/<config name>).")


def main(argv):
  del argv  # cli.run refuses positional arguments.
  workdir = cli.workdir(default=cli.default_workdir())
  train_ae(cli.config_from_flags(), workdir)
  cli.print_run_summary(workdir)


if __name__ == "__main__":
  cli.run(main)
