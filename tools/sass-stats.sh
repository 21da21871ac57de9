#!/usr/bin/env bash
# A kernel's SASS without a GPU: how many instructions of each kind its loops issue (design/CUDA.md
# §1's wheels, plus cuobjdump and nvdisasm from PyPI, cached once). For the kernel-development
# loop on a machine with no card: count what a change removes from a loop before a card times it.
#
# Usage: tools/sass-stats.sh KERNEL [--from HEX --to HEX | --ranges A-B,C-D,…] [--map] [--fatbin PATH]
#   KERNEL           an entry point (e.g. joint_attn_fwd_h4_d64_vfused), from the fatbins the last
#                    `cargo build --release` embedded (target/release/build/advdmd-*/out)
#   --from/--to HEX  count only the instructions at these addresses (as printed), both included
#   --ranges LIST    count the instructions in several half-open ranges HEX-HEX (a path through
#                    the branches --map shows: e.g. a steady tile's taken blocks, skipping the rare
#                    rescale and the partial tile's masking)
#   --map            also list the control, barrier and tensor-core instructions with addresses
#   --cycles         also estimate one warp's cycles over the selection, taken in address order
#                    as a straight path: each instruction issues after its predecessor's stall
#                    count and once the scoreboards it waits on are released (the control bits
#                    ptxas writes into every instruction), variable latencies assumed (below)
#                    and the special-function unit taking 8 cycles a warp instruction (16 lanes
#                    a clock an SM). What a warp costs when no other warp hides its latency, as
#                    in a ping-pong consumer's softmax; not what a card measures
# Prints every loop (a backward branch and its target) with its instruction count and its ten
# commonest opcodes, then the opcode counts of the whole kernel or of the range. Counts are
# static: every instruction between two addresses, whether a branch skips it or not (the tail
# tile's masking, a rare rescale), so pick the range of the path that runs (--map shows the
# branches).
set -euo pipefail
CACHE="${ADVDMD_SASS_CACHE:-$HOME/.cache/advdmd/sass-tools-13.2}"
if [ ! -f "$CACHE/.complete" ]; then
  rm -rf "$CACHE"
  python3 -m venv "$CACHE" >&2
  "$CACHE/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86 >&2
  touch "$CACHE/.complete"
fi
tools="$(dirname "$(find "$CACHE/lib" -path '*nvidia/cu13/bin/cuobjdump' | head -1)")"
export PATH="$tools:$PATH" NVDISASM_PATH="$tools"

kernel="${1:?usage: tools/sass-stats.sh KERNEL [--from HEX --to HEX | --ranges A-B,…] [--map] [--fatbin PATH]}"
shift
from="" to="" ranges="" map=0 fatbin="" cycles=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="$2"; shift 2 ;;
    --to) to="$2"; shift 2 ;;
    --ranges) ranges="$2"; shift 2 ;;
    --map) map=1; shift ;;
    --cycles) cycles=1; shift ;;
    --fatbin) fatbin="$2"; shift 2 ;;
    *) echo "sass-stats: unknown argument $1" >&2; exit 2 ;;
  esac
done

sass="$(mktemp)"
trap 'rm -f "$sass"' EXIT
if [ -n "$fatbin" ]; then
  cuobjdump -sass -fun "$kernel" "$fatbin" >"$sass"
else
  out="$(ls -td target/release/build/advdmd-*/out 2>/dev/null | while read -r d; do
    ls "$d"/*.fatbin >/dev/null 2>&1 && { echo "$d"; break; }; done)"
  [ -n "$out" ] || { echo "sass-stats: no fatbins under target/release/build: cargo build --release first" >&2; exit 1; }
  for f in "$out"/*.fatbin; do
    if cuobjdump -sass -fun "$kernel" "$f" >"$sass" 2>/dev/null && grep -q "Function : $kernel\$" "$sass"; then
      echo "$kernel in $f"
      break
    fi
    : >"$sass"
  done
fi
grep -q "Function : $kernel\$" "$sass" || { echo "sass-stats: $kernel not found" >&2; exit 1; }

python3 - "$sass" "$kernel" "$from" "$to" "$map" "$ranges" "$cycles" <<'PY'
import collections, re, sys
path, kernel, lo, hi, show_map, ranges = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1", sys.argv[6]
show_cycles = sys.argv[7] == "1"
ins = []  # (address, opcode, text)
ctrl = {}  # address -> the instruction's high 64 bits (its control bits: 105..125 of 128)
inside = False
last = None
for line in open(path):
    if "Function :" in line:
        inside = line.split("Function :")[1].strip() == kernel
        continue
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]+);", line)
    if inside and m:
        text = m[2].strip()
        words = text.split()
        op = words[1] if words[0].startswith("@") else words[0]
        ins.append((int(m[1], 16), op, text))
        last = int(m[1], 16)
        continue
    h = re.match(r"\s+/\* 0x([0-9a-f]{16}) \*/\s*$", line)
    if inside and h and last is not None and last not in ctrl:
        ctrl[last] = int(h[1], 16)

def top(body, n=10):
    c = collections.Counter(op for _, op, _ in body)
    return ", ".join(f"{op} {k}" for op, k in c.most_common(n))

print(f"{kernel}: {len(ins)} instructions")
for a, op, text in ins:
    t = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
    if op.startswith("BRA") and t and int(t[1], 16) <= a:
        body = [i for i in ins if int(t[1], 16) <= i[0] <= a]
        print(f"loop {int(t[1], 16):#x}..{a:#x}: {len(body)} instructions: {top(body)}")
if show_map:
    keep = re.compile(r"^(BRA|EXIT|BAR|SYNCS|WARPGROUP|HGMMA|WARPSYNC|VOTE|RET|CALL)")
    for a, op, text in ins:
        if keep.match(op):
            print(f"  {a:#06x}  {text}")
sel = ins
if lo or hi:
    a0 = int(lo, 16) if lo else 0
    a1 = int(hi, 16) if hi else 1 << 62
    sel = [i for i in ins if a0 <= i[0] <= a1]
    print(f"range {a0:#x}..{a1:#x}: {len(sel)} instructions")
elif ranges:
    spans = []
    for r in ranges.split(","):
        a, _, b = r.partition("-")
        try:
            spans.append((int(a, 16), int(b, 16)))
        except ValueError:
            sys.exit(f"sass-stats: --ranges wants HEX-HEX pairs, not {r!r}")
    sel = [i for i in ins if any(a <= i[0] < b for a, b in spans)]
    print(f"ranges {ranges}: {len(sel)} instructions")
for op, k in collections.Counter(op for _, op, _ in sel).most_common():
    print(f"{k:6d}  {op}")

# Assumed latencies (cycles from issue to the scoreboard's release) of the variable-latency
# instructions, by opcode prefix; fixed-latency ones are covered by the stall counts.
LATENCY = [("MUFU", 18), ("LDS", 30), ("LDSM", 30), ("SHFL", 26), ("S2R", 20), ("S2UR", 20),
           ("LDG", 500), ("LDC", 12), ("ULDC", 12), ("F2F", 12), ("I2F", 12), ("F2I", 12),
           ("POPC", 12), ("FLO", 12), ("BREV", 12), ("STS", 4), ("STG", 4), ("RED", 4)]
if show_cycles:
    t, sb, mufu_free, stalls = 0, [0] * 6, 0, 0
    waited = collections.Counter()  # cycles spent waiting, by the producing opcode
    owner = [None] * 6
    for a, op, text in sel:
        hi64 = ctrl.get(a, 0)
        c = hi64 >> 41
        stall, wbar, rbar, wait = c & 15, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 63
        ready = t
        for k in range(6):
            if wait >> k & 1 and sb[k] > ready:
                waited[owner[k] or "?"] += sb[k] - ready
                ready = sb[k]
        if op.startswith("MUFU"):
            if mufu_free > ready:
                waited["MUFU pipe"] += mufu_free - ready
                ready = mufu_free
            mufu_free = ready + 8
        if wbar != 7:
            lat = next((l for p, l in LATENCY if op.startswith(p)), 20)
            sb[wbar] = max(sb[wbar], ready + lat)
            owner[wbar] = op.split(".")[0]
        if rbar != 7:
            sb[rbar] = max(sb[rbar], ready + 4)
            owner[rbar] = op.split(".")[0] + " (read)"
        stalls += stall
        t = ready + max(stall, 1)
    print(f"cycles (one warp, straight path, estimate): {t} for {len(sel)} instructions "
          f"(stall counts {stalls}; scoreboard and pipe waits {t - stalls})")
    for op, k in waited.most_common(8):
        print(f"{k:6d}  waiting for {op}")
PY
