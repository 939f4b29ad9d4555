"""Writes the on-disk latent and text-feature cache that `config.data.source=cache:DIR` trains from.

    python -m sanajax.data.cache --config=configs/sana_1600m.py --config.ae.workdir=AE \
        --config.text.pretrained=GEMMA --src=arrayrecord:/data/shards --dst=/data/cache [--shards=N]
    python -m sanajax.train --config=configs/sana_1600m.py --config.data.source=cache:/data/cache ...

The config is the training run's: its AE (config.ae.workdir, or --workdir's ae/), text encoder
(text.*, the CHI prompt included), data.resolution and data.buckets decide what is stored, and are
recorded, so training with another config is refused by name. Rerun the same command to finish an
interrupted build (whole shards are kept); several processes (the multi-host flags) split the shards.
A CLI module that lives beside the data code it writes for: tests/test_imports.py puts it in the CLI layer.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import jax
from absl import flags

from sanajax import cli
from sanajax.paths import url_path_problem
from sanajax.training.cache_build import build_cache

_CONFIG = cli.define_config_file("configs/tiny.py", "The training config the cache is for.")
cli.define_flags("Optional: where a relative text.pretrained and an empty ae.workdir (WORKDIR/ae) point.")
_SRC = flags.DEFINE_string("src", None, "Data source to cache: folder:DIR, arrayrecord:DIR, webdataset:GLOB, "
                           "tfds:NAME[:SPLIT] or shapes.")
_DST = flags.DEFINE_string("dst", None, "Cache directory (created; rerun with the same one to resume).")
_SHARDS = flags.DEFINE_integer("shards", 0, "Shards (0: one per 5,000 images, at least one per process).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per AE call and captions per text-encoder call.")


def main(argv):
  del argv  # cli.run refuses positional arguments.
  if not _SRC.value or not _DST.value:
    raise cli.UserError("--src and --dst are required.")
  if _SHARDS.value < 0 or _BATCH.value < 1:
    raise cli.UserError("--shards must be >= 0 and --batch_size >= 1.")
  if problem := url_path_problem(_DST.value):
    raise cli.UserError(f"--dst={_DST.value} {problem}.")
  try:
    build_cache(cli.config_from_flags(), _SRC.value, _DST.value, workdir=flags.FLAGS.workdir or "",
                shards=_SHARDS.value, batch_size=_BATCH.value, process_index=jax.process_index(),
                process_count=jax.process_count())
  except ValueError as e:  # a --dst made for another config or source, an unknown --src
    raise cli.UserError(str(e)) from e


if __name__ == "__main__":
  cli.run(main)
