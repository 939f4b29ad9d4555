#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored through .git/info/exclude) the wheels that the lent GPU
# machine's image lacks, for Python 3.12 x86-64: diffusers (the PyTorch reference) and the
# pure-Python packages sanajax imports there (ml_collections; importlib_metadata for diffusers).
# Run it once where pip reaches a package index; then carry ".whl" in the device tool's run call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata==8.7.0  # 8.7: needs only zipp (in the image)
ls -la .whl
