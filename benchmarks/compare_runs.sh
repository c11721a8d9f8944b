#!/usr/bin/env bash
# The comparison runs behind benchmarks/RESULTS.md: the shipped artifact's exact schedule
# (benchmarks/score_embedded.sh) with another calibration mix or another basis, each followed by a small
# ACIP-only curve on the in-domain held-out text and the held-out domain. Outputs in runs/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # name basis data
  out=runs/compare-$1
  if [ ! -f "$out/acip.json" ] || [ -f "$out/checkpoint.json" ]; then
    OUT=$out BASIS=$2 DATA=$3 benchmarks/score_embedded.sh
  fi
  .venv/bin/python -m acip_core curve --artifact "$out" --methods acip --sizes 0.5:0.9:0.1 --windows 32 --replace
}
run books-whitened whitened corpus:train-books
run broad-svd svd corpus:train
