#!/usr/bin/env bash
# The one command for the lent GPU machine: installs what its image lacks, then runs benchmarks.
#
#   benchmarks/run_all.sh                          # every script (needs more than one 10-minute call)
#   benchmarks/run_all.sh dit_forward --cases=4096x1   # one script, extra flags passed through
#
# Run through the device tool from the repository root, carrying the wheels (see README,
# "Benchmarks"): run(command="benchmarks/run_all.sh dit_forward", carry=[".whl"]).
# .whl/ holds the wheels of benchmarks/wheels.txt: diffusers 0.42.1 and what sanajax needs that the
# GPU image (benchmarks/gpu_image/packages.txt) lacks; benchmarks/fetch_wheels.sh fills it on a machine
# with a package index. Rows go to benchmarks/RESULTS.md; a copy of it and the logs go to $OUT
# when the device tool sets it.
#
# The one prepared call for a short device session (benchmarks/run_plan.py: the plan in order of
# value, each step in a time slice, a step that does not fit skipped and reported, compile included;
# the setup below counts against the budget):
#   bash benchmarks/run_all.sh --budget=420                        # rows into benchmarks/RESULTS.md
#   bash benchmarks/run_all.sh --budget=420 --smoke --out=/tmp/R.md   # the same plan on CPU (tests)
set -euo pipefail
START=$(date +%s.%N)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [[ " $* " == *" --budget"* ]]; then
  if [[ " $* " == *" --smoke "* ]]; then  # CPU, tests: no wheels, no GPU facts; run_plan.py finds sanajax itself
    # XLA:CPU compiles are most of a smoke run (the tiny train step's alone took ~20 s); without LLVM's
    # optimisation they take about half as long, and smoke figures are not measurements.
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    exec $PY benchmarks/run_plan.py --t0="$START" "$@"
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true
  status=0
  if [[ -n "${OUT:-}" ]]; then
    $PY benchmarks/run_plan.py --t0="$START" "$@" 2>&1 | tee "$OUT/run_all.log" || status=1  # it copies --out to $OUT
  else
    $PY benchmarks/run_plan.py --t0="$START" "$@" || status=1
  fi
  exit $status
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# sanajax itself, without touching dependencies. Checked from /tmp: `python benchmarks/x.py` puts benchmarks/, not
# the repository root, on sys.path, so sanajax must be installed, not merely importable from here.
if ! (cd /tmp && $PY -c "import sanajax.kernels") 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
fi
$PY - <<'PYEOF'
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.is_available())
try:
  import diffusers; print("diffusers", diffusers.__version__)
except ImportError as e:
  print("diffusers missing (carry .whl, see README):", e)
PYEOF
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true

ALL=(linear_attention dit_forward dcae_decode train_step sprint_sample)
if [[ $# -gt 0 && " ${ALL[*]} " == *" $1 "* ]]; then
  SCRIPTS=("$1"); shift
else
  SCRIPTS=("${ALL[@]}")
fi
status=0
for name in "${SCRIPTS[@]}"; do
  echo "=== $name $* ==="
  if [[ -n "${OUT:-}" ]]; then
    $PY "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.log" || status=1
  else
    $PY "benchmarks/$name.py" "$@" || status=1
  fi
done
if [[ -n "${OUT:-}" ]]; then cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; fi
exit $status
