#!/usr/bin/env bash
# The shipped artifact's curve in every format on both eval sets, 16 windows x 256 tokens per set:
# the rows of curve.csv behind the plots, the GB view, the frontier and the budget picker.
#  1. bfloat16, every method (ACIP, the baselines, block removal, the original), sizes 0.30..1.00 step
#     0.05: the ACIP-vs-baselines comparison (BF16=0 skips it);
#  2. ACIP and the original in FORMATS, sizes 0.3..1.0 step 0.1.
# Each (method, format) line is written into curve.csv as soon as it is measured, so an interrupted run
# is continued by re-running it with the remaining FORMATS (BF16=0 once the bf16 lines are in).
set -euo pipefail
cd "$(dirname "$0")/.."
FORMATS=${FORMATS-float32,int8,int4-g32,int4-g32+emb8,int8+emb8}  # FORMATS= : none
ART=precomputed/smollm2-135m-instruct
if [ "${BF16:-1}" = 1 ]; then
  .venv/bin/python -m acip_core -v curve --artifact $ART --methods all --formats bfloat16 \
    --sizes 0.30:1.00:0.05 --windows 16 "$@"
fi
if [ -n "$FORMATS" ]; then
  .venv/bin/python -m acip_core -v curve --artifact $ART --methods acip --formats "$FORMATS" \
    --sizes 0.30:1.00:0.10 --windows 16 "$@"
fi
