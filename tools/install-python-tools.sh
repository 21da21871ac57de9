#!/usr/bin/env bash
# Installs what the tests of the Python tools need into a cache folder, once, and prints its
# python. Pinned for reproducible CI.
#   tools/install-python-tools.sh [CACHE_DIR]          numpy, safetensors: tools/precompute.py's
#                                                      shard writer (tests/distill_latents.rs)
#   tools/install-python-tools.sh --torch [CACHE_DIR]  also torch, diffusers, transformers, Pillow:
#                                                      precompute.py and decode.py end to end on the
#                                                      CPU with a tiny pipeline (tests/python_tools.rs).
#                                                      PyPI's torch is the CUDA build (~5.7 GB with its
#                                                      libraries); it runs on a CPU.
# bench_vs_torch.py runs on the GPU machines' own torch.
set -euo pipefail
SET=base
if [ "${1:-}" = "--torch" ]; then SET=torch; shift; fi
if [ "$SET" = torch ]; then
  CACHE="${1:-${ADVDMD_PY_TORCH_CACHE:-$HOME/.cache/advdmd/py-torch}}"
  PACKAGES=(numpy==2.4.6 safetensors==0.8.0 torch==2.15.0 diffusers==0.42.1 transformers==5.24.0
            tokenizers==0.23.3 huggingface_hub==2.4.0 pillow==13.0.0)
  IMPORTS="import numpy, safetensors, torch, diffusers, transformers, PIL"
else
  CACHE="${1:-${ADVDMD_PY_CACHE:-$HOME/.cache/advdmd/py-tools}}"
  PACKAGES=(numpy==2.4.6 safetensors==0.8.0)
  IMPORTS="import numpy, safetensors"
fi
if [ ! -f "$CACHE/.complete" ]; then
  rm -rf "$CACHE"
  "${PYTHON:-python3}" -m venv "$CACHE" >&2
  "$CACHE/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
  touch "$CACHE/.complete"
fi
"$CACHE/bin/python" -c "$IMPORTS" || { echo "install-python-tools: imports fail" >&2; exit 1; }
echo "$CACHE/bin/python"
