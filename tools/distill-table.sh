#!/usr/bin/env bash
# Runs the issue-5 results table's distillations for one seed (README "Distillation results"):
# a shared 500-iteration prefix per K (identical with and without RL, and before a freeze at 500,
# so each branch forks from it exactly: `advdmd distill --fork-from`), then the branches to 1200
# iterations, then samples and scores each EMA generator on the 500 fixed evaluation prompts.
#
#   tools/distill-table.sh SEED OUTDIR [ADVDMD_BIN]     (seed 0 also scores the teacher)
#   python3 tools/distill_table.py OUTDIR               the table and the curves (markdown)
#
# Two seeds side by side on 2 cores: run two of these at once with RAYON_NUM_THREADS=1 each.
set -euo pipefail
s=$1; R=$2; B=${3:-target/release/advdmd}
mkdir -p "$R/ev"
log() { echo "$(date +%s) $*" >> "$R/lane$s.log"; }
run() { # name, then distill flags
  local name=$1; shift
  log start "$name"
  local t0; t0=$(date +%s)
  local rc=0
  "$B" distill "$@" --seed "$s" --eval-per-task 0 > "$R/$name.out" 2>&1 || rc=$?
  log end "$name" rc=$rc secs=$(( $(date +%s) - t0 ))
  [ $rc -eq 0 ] || { echo "distill $name failed: $R/$name.out" >&2; exit $rc; }
}
branch() { # prefix, name, then distill flags
  local prefix=$1 name=$2; shift 2
  run "$name" --out "$R/$name" --fork-from "$R/$prefix" --iterations 1200 "$@"
  "$B" sample --checkpoint "$R/$name/model" --prompts eval:100 --out "$R/ev/$name" > /dev/null 2>&1
  "$B" eval "$R/ev/$name" --json > "$R/ev/$name.json"
}
if [ "$s" = 0 ]; then # the teacher rows (sampling seed 0 like every row; CFG 3 as in assets/README.md)
  for n in 40 4 2; do
    "$B" sample --prompts eval:100 --steps $n --cfg 3 --out "$R/ev/teacher-$n" > /dev/null 2>&1
    "$B" eval "$R/ev/teacher-$n" --json > "$R/ev/teacher-$n.json"
  done
fi
run "k4-s$s-prefix" --out "$R/k4-s$s-prefix" --iterations 500 --steps-per-sample 4
branch "k4-s$s-prefix" "advdmd4-s$s" --steps-per-sample 4
branch "k4-s$s-prefix" "dmd2-4-s$s" --steps-per-sample 4 --no-rl
run "k2-s$s-prefix" --out "$R/k2-s$s-prefix" --iterations 500 --steps-per-sample 2
branch "k2-s$s-prefix" "advdmd2-s$s" --steps-per-sample 2
branch "k2-s$s-prefix" "dmd2-2-s$s" --steps-per-sample 2 --no-rl
branch "k4-s$s-prefix" "frozen4-s$s" --steps-per-sample 4 --frozen-disc-after 500
log lane done
