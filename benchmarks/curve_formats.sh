#!/usr/bin/env bash
# ACIP (and the original) of the shipped artifact in every format on both eval sets: the rows of
# curve.csv behind the GB view, the frontier and the budget picker. 16 windows x 256 tokens per set,
# sizes 0.3..1.0 step 0.1; each (method, format) line is written into curve.csv as soon as it is
# measured, so an interrupted run is continued by re-running it with the remaining FORMATS.
set -euo pipefail
cd "$(dirname "$0")/.."
FORMATS=${FORMATS:-float32,int8,int4-g32,int4-g32+emb8,int8+emb8}
.venv/bin/python -m acip_core -v curve --artifact precomputed/smollm2-135m-instruct --methods acip \
  --formats "$FORMATS" --sizes 0.30:1.00:0.10 --windows 16 "$@"
