#!/usr/bin/env bash
# Fills wheels/ (git-ignored) with what bench/gpu.sh installs on a GPU machine without network:
# diffusers and the packages it imports that a JAX + PyTorch + transformers image may lack
# (Pillow as binaries for CPython 3.10-3.13, the rest pure Python). Run it here, then carry
# wheels/ along with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
pip() { python3 -m pip download --no-deps -d wheels "$@"; }
pip "diffusers==0.42.1" filelock
for py in 3.10 3.11 3.12 3.13; do
  pip --only-binary=:all: --python-version "$py" --platform manylinux_2_28_x86_64 \
      --platform manylinux2014_x86_64 pillow
done
ls -l wheels
