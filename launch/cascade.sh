#!/usr/bin/env bash
# SANA's progressive-resolution cascade: one training stage per resolution, each starting from the
# previous stage's EMA weights (--config.train.init_from=<previous stage's workdir>; docs/data.md#cascade).
#
# Usage:
#   launch/cascade.sh CONFIG ROOT RESOLUTIONS STEPS [-- EXTRA FLAGS...]
#   launch/cascade.sh configs/sana_1600m.py /ckpt/cascade "512 1024 2048 4096" "100000 50000 10000 5000" \
#       -- --config.data.source=arrayrecord:/data/shards --config.ae.workdir=/w/dcae --config.text.pretrained=/w/gemma
#   launch/cascade.sh configs/tiny.py /tmp/cascade "32 64" "200 200" -- --config.ae.workdir=/tmp/ae
#
# Stage R trains in ROOT/<R>px with --config.data.resolution=R, so everything that follows from the
# resolution (latent size, the 2D sin-cos PE that the presets switch on at 2K/4K, flow shift, batch size,
# the bucket table) is re-derived for it; the DiT's parameters do not depend on the resolution, so the
# previous stage's EMA loads as is. A stage already finished is resumed (and ends at once), so rerunning
# the script after an interruption continues where it stopped. To feed a stage from an on-disk cache,
# build one per resolution (python -m sanajax.data.cache) and pass --config.data.source=cache:DIR in
# the extra flags of that run. Wrap the python command (e.g. srun, launch/gpu_slurm.sh) with $LAUNCH.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
  exit 2
fi
CONFIG=$1; ROOT=$2; read -r -a RESOLUTIONS <<< "$3"; read -r -a STEPS <<< "$4"; shift 4
if [[ $# -gt 0 ]]; then
  [[ $1 == "--" ]] || { echo "expected -- before the extra flags" >&2; exit 2; }
  shift
fi
if [[ ${#RESOLUTIONS[@]} -ne ${#STEPS[@]} ]]; then
  echo "give one step count per resolution (${#RESOLUTIONS[@]} resolutions, ${#STEPS[@]} step counts)" >&2
  exit 2
fi
PREVIOUS=""
for i in "${!RESOLUTIONS[@]}"; do
  R=${RESOLUTIONS[$i]}
  WORKDIR="$ROOT/${R}px"
  INIT=()
  if [[ -n $PREVIOUS ]]; then INIT=(--config.train.init_from="$PREVIOUS"); fi
  echo "== stage $((i + 1))/${#RESOLUTIONS[@]}: ${R} px, ${STEPS[$i]} steps, workdir $WORKDIR${PREVIOUS:+, from $PREVIOUS}"
  ${LAUNCH:-} python -m sanajax.train --config="$CONFIG" --workdir="$WORKDIR" --config.data.resolution="$R" \
    --config.train.num_steps="${STEPS[$i]}" "${INIT[@]}" "$@"
  PREVIOUS=$WORKDIR
done
