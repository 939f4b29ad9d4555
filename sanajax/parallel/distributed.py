"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

One process per host (per GPU node, per TPU VM); each sees its local devices and together they
form one global mesh. Call `initialize()` before any other JAX call:

  - explicit: --coordinator=HOST:PORT --num_processes=N --process_id=I (or the environment
    variables SANAJAX_COORDINATOR, SANAJAX_NUM_PROCESSES, SANAJAX_PROCESS_ID, which
    launch/local_multiprocess.sh sets);
  - SLURM (srun sets SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID...) and TPU pods are detected by
    JAX itself: `initialize(auto=True)` (launch/gpu_slurm.sh, launch/tpu_pod.sh pass
    --distributed=auto);
  - otherwise nothing happens and the run is single-process.

CPU processes (tests, launch/local_multiprocess.sh) talk through gloo collectives.
"""
from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "SANAJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SANAJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SANAJAX_PROCESS_ID"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
  """Starts JAX's multi-controller runtime; returns True if this is a multi-process run.

  Arguments fall back to the SANAJAX_* environment variables. `auto` lets JAX detect SLURM /
  TPU-pod / MPI clusters when no coordinator is given.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator is None and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("num_processes / process_id were given without a coordinator address (HOST:PORT).")
    return False
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError(f"coordinator {coordinator!r} needs num_processes and process_id as well.")
  if coordinator is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices of different processes need a collectives library to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return jax.process_count() > 1


def define_flags() -> None:
  """--coordinator, --num_processes, --process_id, --distributed for the training CLIs."""
  from absl import flags
  flags.DEFINE_string("coordinator", None, "Multi-host: HOST:PORT of process 0's coordinator service.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
  flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                    "auto: jax.distributed.initialize() detects SLURM / TPU pods / MPI.")


def initialize_from_flags() -> bool:
  from absl import flags
  f = flags.FLAGS
  return initialize(f.coordinator, f.num_processes, f.process_id, auto=f.distributed == "auto")
