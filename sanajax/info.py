"""Model facts from a config, without allocating it: parameters, shapes, FLOPs per training step.

    python -m sanajax.info --config=configs/sana_1600m.py [--config.data.resolution=4096]
    python -m sanajax.info --config=configs/sana_1600m.py --config.mesh.fsdp=8   # per-device memory of a plan
    python -m sanajax.info --config=configs/sprint_1600m.py --config.mesh.fsdp=8  # + teacher and LADD heads
    python -m sanajax.info --compile   # AOT train-step compile time, 600M / 1600M / 60 blocks, scan vs unrolled

Counts the DiT only (not the text encoder or the autoencoder): sanajax.models.dit_facts says how.
"""
from __future__ import annotations

from sanajax import hugepage_malloc

hugepage_malloc.reexec_if_main(__name__)  # before the imports below, which would otherwise run twice

import jax
from absl import flags

from sanajax import cli
from sanajax.config_check import validate_model_fields
from sanajax.models.dit_facts import describe, format_description
from sanajax.training import compile_time, memory


def main(argv):
  del argv  # cli.run refuses positional arguments.
  if _COMPILE.value:  # six train steps lowered and compiled: minutes on CPU (docs/scaling.md#compile-time)
    rows = compile_time.compile_table(progress=lambda line: print(line, flush=True))
    print(compile_time.format_compile_table(rows))
    return
  config = cli.config_from_flags()
  validate_model_fields(config)  # e.g. model.depth=0 is one line (exit 2), not a table of zeros
  lines = format_description(describe(config)).splitlines()
  # Per-device bytes under config.mesh (a -1 axis takes this machine's device count).
  # A Sprint student config (a `distill` section) adds the teacher and the LADD heads.
  plan_memory = memory.distill_plan_memory if "distill" in config else memory.plan_memory
  mem = memory.format_plan_memory(plan_memory(config, jax.device_count()))
  print("\n".join(lines[:-1] + mem.splitlines() + lines[-1:]))


if __name__ == "__main__":
  # Defined here, not at import: tests and other modules import this module without claiming --config.
  _CONFIG = cli.define_config_file("configs/tiny.py", "Config file, e.g. configs/sana_1600m.py[:RES].")
  _COMPILE = flags.DEFINE_bool("compile", False, "Instead: the AOT compile time of the train step for 600M, "
                               "1600M and 1600M at 60 blocks, scanned vs unrolled blocks (compiled on this machine, "
                               "~6 min on 2 idle CPU cores; a line as each step starts and ends).")
  cli.define_flags(multihost=False)
  cli.run(main)
