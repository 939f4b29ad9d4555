#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of its GPUs visible to it.
#
# Usage (from a login node; edit the #SBATCH lines or pass them to sbatch):
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh --config=configs/sana_1600m.py \
#       --workdir=/shared/runs/sana1600m --config.mesh.fsdp=8 --config.mesh.data=-1 \
#       --config.data.source=folder:/shared/images --config.train.batch_size=256
#
# Every argument goes to `python -m sanajax.train`. jax.distributed.initialize() reads the
# SLURM environment (--distributed=auto): coordinator = the first node, one process per task.
# Put fsdp (or tensor) inside a node and data across nodes: the mesh's outer axis (data) is laid
# over hosts, so only gradient all-reduces cross the network. The workdir must be on a file
# system every node sees (Orbax writes each host's shards there); logs and metrics come from
# process 0. Needs jax[cuda] installed on every node. Five minutes before --time runs out SLURM sends
# SIGTERM (--signal): every process finishes its step, they save it together and exit 143; submitting the
# same command again resumes there (sanajax/training/interrupt.py).
#SBATCH --job-name=sanajax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
set -euo pipefail

if [[ $# -eq 0 ]]; then
  awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
# Let XLA use the GPU memory it needs for FSDP collectives (not a 75% preallocation).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
srun --ntasks-per-node=1 python -m sanajax.train --distributed=auto "$@"
