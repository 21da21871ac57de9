#!/usr/bin/env bash
# Installs the pinned CUDA 13.0.x compiler wheels from PyPI into a cache folder, once, and prints
# the nvcc path (design/CUDA.md §1). Pinned because a newer nvcc emits PTX the GPU machines'
# driver (580, PTX ISA 9.0) rejects. Usage: tools/install-cuda-toolchain.sh [CACHE_DIR]
set -euo pipefail
CACHE="${1:-${ADVDMD_CUDA_CACHE:-$HOME/.cache/advdmd/cuda-13.0}}"
PY="${PYTHON:-python3}"
if [ ! -f "$CACHE/.complete" ]; then
  rm -rf "$CACHE"
  "$PY" -m venv "$CACHE" >&2
  "$CACHE/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
  # The venv's python version decides the site-packages folder; find nvcc wherever it landed.
  found="$(find "$CACHE/lib" -path '*nvidia/cu13/bin/nvcc' | head -1)"
  [ -n "$found" ] || { echo "install-cuda-toolchain: nvcc missing after install" >&2; exit 1; }
  touch "$CACHE/.complete"
fi
found="$(find "$CACHE/lib" -path '*nvidia/cu13/bin/nvcc' | head -1)"
"$found" --version >/dev/null || { echo "install-cuda-toolchain: $found does not run" >&2; exit 1; }
echo "$found"
