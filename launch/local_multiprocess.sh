#!/usr/bin/env bash
# Runs N sanajax training processes on this machine, as N "hosts" of one multi-host run.
#
# Usage:
#   launch/local_multiprocess.sh N [DEVICES_PER_PROCESS] -- python -m sanajax.train --config=configs/tiny.py \
#       --workdir=/tmp/mh --config.mesh.fsdp=-1
#
# Each process gets DEVICES_PER_PROCESS (default 2) fake CPU devices
# (XLA_FLAGS=--xla_force_host_platform_device_count), the coordinator address localhost:PORT
# (PORT from $SANAJAX_PORT, default 12355) and its index through SANAJAX_COORDINATOR,
# SANAJAX_NUM_PROCESSES and SANAJAX_PROCESS_ID, which sanajax.parallel.distributed reads; CPU
# processes talk through gloo collectives. This is the multi-host code path (global arrays,
# per-host data shards, collective checkpoints) on any machine, e.g. to try a plan before a
# cluster run. Logs: process 0 prints to the terminal, the others to $LOG_DIR/process_I.log
# (default /tmp/sanajax_local_multiprocess). The script exits with the first non-zero status.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
N=$1; shift
PER=2
if [[ $1 != "--" ]]; then PER=$1; shift; fi
[[ $1 == "--" ]] || { echo "expected -- before the command" >&2; exit 2; }
shift
PORT=${SANAJAX_PORT:-12355}
LOG_DIR=${LOG_DIR:-/tmp/sanajax_local_multiprocess}
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < N; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${PER}" \
    SANAJAX_COORDINATOR="localhost:${PORT}" SANAJAX_NUM_PROCESSES="$N" SANAJAX_PROCESS_ID="$i" \
    "$@" > >(if [[ $i == 0 ]]; then cat; else cat > "$LOG_DIR/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; [[ $status == 0 ]] && status=$s; }
done
exit $status
