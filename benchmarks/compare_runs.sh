#!/usr/bin/env bash
# Shorter comparison runs behind benchmarks/RESULTS.md: the shipped artifact's schedule
# (benchmarks/score_embedded.sh) but stopped at size 0.5 without post-tuning, with another calibration
# mix or another basis; each followed by a small ACIP-only curve on the in-domain held-out text and
# the held-out domain. Outputs in runs/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # name basis data
  out=runs/compare-$1
  if [ ! -f "$out/acip.json" ] || [ -f "$out/checkpoint.json" ]; then
    OUT=$out BASIS=$2 DATA=$3 POST_TUNE=0 benchmarks/score_embedded.sh --stop-ratio 0.5
  fi
  .venv/bin/python -m acip_core curve --artifact "$out" --methods acip --sizes 0.5:0.9:0.1 --windows 16 --replace
}
for spec in "$@"; do run ${spec//,/ }; done
