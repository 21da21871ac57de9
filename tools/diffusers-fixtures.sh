#!/usr/bin/env bash
# Writes the MMDiT fixtures diffusers computes for the SD3-family blocks the shared fixture lacks
# (tests/tools/make_mmdit_fixture.py: SD3-medium's and SD3.5-large's, float64 on the CPU), each with
# its original layout by `advdmd convert`, into OUT; prints them `:`-separated for MMDIT_FIXTURES.
# Usage: tools/diffusers-fixtures.sh OUT [ADVDMD]   (python: $ADVDMD_TORCH_PYTHON, else
# tools/install-python-tools.sh --torch; ADVDMD default: the release build's advdmd)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$1"
ADVDMD="${2:-${CARGO_TARGET_DIR:-target}/release/advdmd}"
PY="${ADVDMD_TORCH_PYTHON:-$(tools/install-python-tools.sh --torch)}"
mkdir -p "$OUT"
written="$(HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error PYTHONDONTWRITEBYTECODE=1 \
  "$PY" tests/tools/make_mmdit_fixture.py "$OUT")"
list=""
for dir in $written; do
  "$ADVDMD" convert "$dir/diffusers.safetensors" "$dir/original.safetensors" --layout original >&2
  list="${list:+$list:}$dir"
done
echo "$list"
