#!/usr/bin/env bash
# Installs what the tests of the Python tools need (numpy, safetensors: tools/precompute.py's
# shard writer) into a cache folder, once, and prints its python. Pinned for reproducible CI.
# The tools themselves (precompute.py, decode.py, bench_vs_torch.py) also need torch and diffusers,
# which only the machines that run them install. Usage: tools/install-python-tools.sh [CACHE_DIR]
set -euo pipefail
CACHE="${1:-${ADVDMD_PY_CACHE:-$HOME/.cache/advdmd/py-tools}}"
if [ ! -f "$CACHE/.complete" ]; then
  rm -rf "$CACHE"
  "${PYTHON:-python3}" -m venv "$CACHE" >&2
  "$CACHE/bin/pip" install --quiet --disable-pip-version-check numpy==2.4.6 safetensors==0.8.0 >&2
  touch "$CACHE/.complete"
fi
"$CACHE/bin/python" -c "import numpy, safetensors" || { echo "install-python-tools: imports fail" >&2; exit 1; }
echo "$CACHE/bin/python"
