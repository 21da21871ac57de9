#!/usr/bin/env bash
# A checkpoint teacher's distillation end to end on one device, as a user runs it: random data
# written by tools/precompute.py's writer (torch tensors where torch is installed, else numpy),
# `advdmd distill --data` for 2 iterations, `--resume` to 4 (the EMA generator sampled at each
# checkpoint), then the exported generator sampled: the same latents as the last checkpoint's.
# tools/gpu-check.sh runs it on the GPU (step distill-latents); here: emu.
# Usage: tools/distill-latents-check.sh DEVICE ADVDMD_BIN TEACHER.safetensors WORKDIR
# (the teacher: the tiny SD3.5-medium fixture's original.safetensors: 4 channels, context 24,
# pooled 20). PYTHON picks the interpreter.
set -euo pipefail
[ $# -eq 4 ] || { sed -n 2,9p "$0"; exit 2; }
device=$1 bin=$2 teacher=$3 work=$4
tools="$(cd "$(dirname "$0")" && pwd)"
rm -rf "$work" && mkdir -p "$work/data"
"${PYTHON:-python3}" - "$tools" "$work/data" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import precompute
out = sys.argv[2]
try:
    import torch
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g)
    half = lambda t: t.bfloat16()
except ImportError:
    import numpy as np
    rng = np.random.default_rng(0)
    randn = lambda *s: rng.standard_normal(s).astype(np.float32)
    half = lambda t: t.astype(np.float16)
for i in range(2):
    precompute.write_shard(f"{out}/shard-{i:05d}.safetensors", randn(3, 4, 8, 8),
                           half(randn(3, 7, 24)), randn(3, 20), [f"caption {i}.{j}" for j in range(3)])
precompute.write_uncond(out, half(randn(1, 7, 24)), randn(1, 20))
PY
for iterations in 2 4; do
  resume=(); [ "$iterations" = 4 ] && resume=(--resume)
  "$bin" distill --device "$device" --teacher "$teacher" --data "$work/data" --prompts 2 --group 2 \
    --steps-per-sample 2 --r-dmd 2 --rl-warmup 0 --iterations "$iterations" --checkpoint-every 2 \
    "${resume[@]}" --out "$work/run"
done
cat "$work/run/metrics.jsonl"
"$bin" sample --device "$device" --checkpoint "$work/run/model" --data "$work/data" --count 4 --out "$work/samples"
head -2 "$work/samples/manifest.jsonl"
"$bin" sample --device "$device" --sampler sde --checkpoint "$work/run/model" --data "$work/data" \
  --count 4 --out "$work/samples-sde"
grep -q '"sampler":"sde"' "$work/samples-sde/manifest.jsonl" || { echo "no re-noised samples" >&2; exit 1; }
[ "$(wc -l < "$work/run/metrics.jsonl")" = 4 ] || { echo "expected 4 metrics lines" >&2; exit 1; }
# each checkpoint's samples of the EMA generator; the last one's are what `sample` drew above
for it in 0000002 0000004; do
  [ "$(wc -l < "$work/run/samples/iter-$it/manifest.jsonl")" = 4 ] \
    || { echo "expected 4 samples at iteration $it" >&2; exit 1; }
done
# (bit for bit on the emulator; a GPU's GEMM algorithms are chosen per process: within bf16)
"${PYTHON:-python3}" - "$work/run/samples/iter-0000004/latents.safetensors" \
    "$work/samples/latents.safetensors" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
a, b = (load_file(f)["latents"].astype(np.float64) for f in sys.argv[1:])
rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
print(f"the last checkpoint's samples against sample's: relative L2 {rel:.3g}")
sys.exit(0 if rel <= 2e-2 else "they differ")
PY
echo "distill-latents-check: ok"
