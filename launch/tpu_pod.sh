#!/usr/bin/env bash
# Training on a TPU VM pod slice: the same command on every worker (one process per TPU VM host).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config=configs/sana_1600m.py \
#       --workdir=/gcs/bucket/runs/sana1600m --config.mesh.fsdp=-1 --config.data.source=folder:/data/images
#
# Runs `gcloud compute tpus tpu-vm ssh TPU_NAME --worker=all --command=...` so every host starts
# `python -m sanajax.train --distributed=auto ARGS` in $REPO_DIR (default ~/sanajax) at the same
# time; jax.distributed.initialize() finds the pod's coordinator itself. The repository and its
# dependencies (jax[tpu]) must already be on every worker (e.g. `--worker=all --command="git clone
# ... && pip install -e ."`), the workdir on storage all hosts share (a GCS bucket mounted at the same
# path on every host, e.g. `gcsfuse bucket /gcs/bucket`: a gs:// URL is refused, as workdirs are plain
# files), and the data readable from every host (each reads only its own shard). A v5e-16 (16 chips of 16 GB, 4 hosts):
# --config.mesh.fsdp=16 holds Sana-1600M with ~2.4 GB per chip (README "Scaling").
set -euo pipefail

if [[ $# -lt 3 ]]; then
  awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
TPU=$1; ZONE=$2; shift 2
PROJECT_ARGS=()
if [[ $1 != "--" ]]; then PROJECT_ARGS=(--project "$1"); shift; fi
[[ $1 == "--" ]] || { echo "expected -- before the training arguments" >&2; exit 2; }
shift
REPO_DIR=${REPO_DIR:-~/sanajax}
printf -v ARGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all \
  --command="cd $REPO_DIR && python -m sanajax.train --distributed=auto $ARGS"
