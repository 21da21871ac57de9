#!/usr/bin/env bash
# Where the default attention kernels' warps stall, instruction by instruction (gpu-check's
# `ncu-source` step; needs Nsight Compute's `ncu` and a card). For each kernel: one launch of the
# attention bench's first shape (SD3.5-medium 1024 px, d64, batch 2) profiled with the source
# counters (warp-state samples per SASS instruction) and every stall reason's share; its details
# page; and the SASS with its samples (OUTDIR/ncu-KERNEL-sass.csv), summed by
# tools/ncu-sass-top.py. The report itself (OUTDIR/ncu-KERNEL.ncu-rep, megabytes, for Nsight
# Compute's GUI) is removed afterwards unless NCU_KEEP_REPORTS=1: what a device call brings back
# is the text.
#
# Usage: tools/ncu-source.sh BENCH OUTDIR [KERNEL…]   (default kernels: the forward H4 and the
#        backward H6, the defaults at d = 64)
set -uo pipefail
bench="${1:?usage: tools/ncu-source.sh BENCH OUTDIR [KERNEL…]}"
out="${2:?usage: tools/ncu-source.sh BENCH OUTDIR [KERNEL…]}"
shift 2
[ $# -gt 0 ] || set -- joint_attn_fwd_h4_d64 joint_attn_bwd_h6_d64
here="$(dirname "$0")"
rc=0
for k in "$@"; do
  rep="$out/ncu-$k"
  echo "== $k"
  if ! ncu --clock-control none --kernel-name "regex:^$k\$" --launch-count 1 \
      --section SourceCounters --section WarpStateStats --section SchedulerStats \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      --export "$rep" --force-overwrite "$bench" >"$rep.profile.log" 2>&1; then
    echo "$k: ncu failed (tail of $rep.profile.log):"; tail -5 "$rep.profile.log"; rc=1; continue
  fi
  ncu --import "$rep.ncu-rep" --page details --print-units base || rc=1
  # every stall reason's warps a issued instruction, largest first
  ncu --import "$rep.ncu-rep" --page raw --csv \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' 2>/dev/null \
    | python3 "$here/ncu-sass-top.py" --raw-stalls - || rc=1
  if ncu --import "$rep.ncu-rep" --page source --csv --print-source sass >"$rep-sass.csv" 2>"$rep-sass.err"; then
    python3 "$here/ncu-sass-top.py" "$rep-sass.csv" || rc=1
  else
    echo "$k: no source page:"; tail -3 "$rep-sass.err"; rc=1
  fi
  [ "${NCU_KEEP_REPORTS:-0}" = 1 ] || rm -f "$rep.ncu-rep"
done
exit $rc
