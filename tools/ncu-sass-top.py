#!/usr/bin/env python3
"""Sums Nsight Compute's per-instruction warp samples (tools/ncu-source.sh).

  ncu-sass-top.py SASS.csv        the source page as CSV (`ncu --import R --page source --csv
                                  --print-source sass`): the total samples, the instructions
                                  with the most, each with its top stall reasons where the page
                                  has them, and the samples by opcode
  ncu-sass-top.py --raw-stalls F  the raw page's `smsp__average_warps_issue_stalled_*` metrics
                                  (F = - for stdin): every stall reason, largest first

The column names differ between Nsight Compute versions, so columns are found by what their
names contain; what is not found is said, not guessed."""
import csv
import re
import sys
from collections import defaultdict

TOP = 30


def number(s):
    s = (s or "").strip().replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def find(header, *needles):
    for i, h in enumerate(header):
        if all(n.lower() in h.lower() for n in needles):
            return i
    return None


def opcode(sass):
    toks = [t for t in sass.split() if not t.startswith("@")]
    return toks[0].rstrip(";") if toks else "?"


def sass_top(path):
    rows = list(csv.reader(open(path, newline="")))
    # the header is the first row naming an address and a source column
    at = next((i for i, r in enumerate(rows) if find(r, "address") is not None and find(r, "source") is not None), None)
    if at is None:
        print(f"{path}: no header with Address and Source columns; first row: {rows[0] if rows else None}")
        return 1
    header, body = rows[at], rows[at + 1:]
    a, src = find(header, "address"), find(header, "source")
    allc = find(header, "stall sampling", "all")
    if allc is None:
        allc = find(header, "samples")
    if allc is None:
        print(f"{path}: no sample column among {header}")
        return 1
    noti = find(header, "not-issued") or find(header, "not issued")
    reasons = [i for i, h in enumerate(header) if i not in (allc, noti) and re.search(r"stall", h, re.I)]
    recs = []
    for r in body:
        if len(r) <= max(a, src, allc):
            continue
        n = number(r[allc])
        if n is None:
            continue
        why = sorted(((number(r[i]) or 0.0, header[i]) for i in reasons if i < len(r)), reverse=True)
        recs.append((n, r[a], r[src].strip(), number(r[noti]) if noti is not None and noti < len(r) else None, why))
    total = sum(x[0] for x in recs) or 1.0
    print(f"{path}: {len(recs)} instructions, {total:.0f} samples (column '{header[allc]}')")
    if not reasons:
        print("  (no per-reason columns on this page)")
    print(f"  top {TOP}: samples, share, not issued, address, instruction[, top reasons]")
    for n, addr, sass, ni, why in sorted(recs, key=lambda x: -x[0])[:TOP]:
        reason = ", ".join(f"{h} {v:.0f}" for v, h in why[:3] if v > 0)
        ni = "" if ni is None else f"{ni:.0f}"
        print(f"  {n:8.0f} {100 * n / total:5.1f}% {ni:>8} {addr:>8}  {sass[:70]}" + (f"  [{reason}]" if reason else ""))
    by_op = defaultdict(float)
    for n, _, sass, _, _ in recs:
        by_op[opcode(sass)] += n
    print("  by opcode:", ", ".join(f"{op} {100 * n / total:.1f}%" for op, n in sorted(by_op.items(), key=lambda x: -x[1])[:15]))
    return 0


def raw_stalls(path):
    f = sys.stdin if path == "-" else open(path, newline="")
    rows = [r for r in csv.reader(f) if r]
    at = next((i for i, r in enumerate(rows) if any("issue_stalled" in c for c in r)), None)
    if at is None:
        print("raw stalls: no smsp__average_warps_issue_stalled_* columns")
        return 1
    header = rows[at]
    data = [r for r in rows[at + 1:] if any(number(c) is not None for c in r)]
    for r in data:
        name = r[find(header, "kernel name")] if find(header, "kernel name") is not None else "kernel"
        vals = []
        for i, h in enumerate(header):
            m = re.match(r"smsp__average_warps_issue_stalled_(.*)_per_issue_active\.ratio", h)
            v = number(r[i]) if i < len(r) else None
            if m and v is not None:
                vals.append((v, m.group(1)))
        tot = sum(v for v, _ in vals) or 1.0
        print(f"{name}: warps stalled a issued instruction, by reason ({tot:.2f} in all)")
        print("  " + ", ".join(f"{k} {v:.2f}" for v, k in sorted(vals, reverse=True) if v >= 0.01))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-stalls":
        sys.exit(raw_stalls(sys.argv[2]))
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(sass_top(sys.argv[1]))
