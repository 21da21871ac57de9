#!/usr/bin/env bash
# Where the device model path's time goes, on a lent GPU (issue 8): Nsight Compute's per-kernel
# durations (one metric, clocks left alone) over a 1-step sample (two forwards: the warm-up and
# the timed one) and over `bench mmdit --iters 1` past its two forwards (into forward+backward), summed per
# kernel family, next to the wall-clock figures of the same binaries. Also the bench at a few more
# shapes (512 px, batch 4, checkpointing). Needs the binaries of `tools/gpu-check.sh --bundle`.
#   tools/gpu-profile.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.gpu/bin OUT="${1:?usage: tools/gpu-profile.sh OUTDIR}"
mkdir -p "$OUT"
A="$BIN/advdmd"
M="--device cuda --model sd3.5-medium"
NCU="ncu --metrics gpu__time_duration.sum --clock-control none --cache-control none --csv --print-units base"
t0=$(date +%s)
timeout 110 $NCU --log-file "$OUT/ncu-sample.csv" "$A" bench sample $M --res 1024 --steps 1 --iters 1 >"$OUT/ncu-sample.out" 2>&1; echo "ncu sample rc=$? $(( $(date +%s) - t0 )) s"
# kernels launched by the sample run (model upload, two forwards): skip as many in the mmdit run
# (same upload, then its two forwards), and profile as many more as fit in ~100 s at this pace.
NK=$(grep -c gpu__time_duration "$OUT/ncu-sample.csv" || echo 0); DT=$(( $(date +%s) - t0 ))
NB=$(( NK > 0 ? 80 * NK / (DT > 1 ? DT : 1) : 2000 )); echo "sample kernels $NK, profile $NB of forward+backward"
timeout 40 "$A" bench mmdit $M --res 512 --batch 4 --iters 5 >"$OUT/mmdit-512-b4.txt" 2>&1; echo "512 b4 rc=$?"
timeout 40 "$A" bench mmdit $M --res 1024 --batch 1 --iters 5 --checkpoint-activations >"$OUT/mmdit-1024-ckpt.txt" 2>&1; echo "ckpt rc=$?"
timeout 110 $NCU --launch-skip "$NK" --launch-count "$NB" --log-file "$OUT/ncu-mmdit.csv" "$A" bench mmdit $M --res 1024 --iters 1 >"$OUT/ncu-mmdit.out" 2>&1; echo "ncu mmdit rc=$?"
python3 - "$OUT" <<'PY'
import csv, collections, sys, os
out = sys.argv[1]
for name in ("ncu-sample", "ncu-mmdit"):
    p = f"{out}/{name}.csv"
    if not os.path.exists(p): continue
    lines = [l for l in open(p) if l.startswith('"')]
    rows = list(csv.DictReader(lines))
    tot = collections.defaultdict(float); cnt = collections.Counter()
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum": continue
        k = r["Kernel Name"].split("(")[0].split("<")[0][:60]
        tot[k] += float(r["Metric Value"].replace(",", "")) / 1e6; cnt[k] += 1
    s = sum(tot.values())
    print(f"== {name}: {sum(cnt.values())} kernels, {s:.2f} ms of kernel time")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{v:9.3f} ms {100*v/s:5.1f}%  x{cnt[k]:<5d} {k}")
PY
grep -h "ms\|MFU\|peak" "$OUT"/mmdit-*.txt | head -30
