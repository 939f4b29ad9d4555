#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored through .git/info/exclude) the wheels that the lent GPU
# machine's image lacks, for Python 3.12 x86-64: the pins of benchmarks/wheels.txt (diffusers, the
# PyTorch reference, and what sanajax imports there that the image, benchmarks/gpu_image/packages.txt,
# does not hold; tests/test_benchmarks.py runs the plan held to that list).
# Run it once where pip reaches a package index; then carry ".whl" in the device tool's run call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 -d .whl -r benchmarks/wheels.txt
ls -la .whl
