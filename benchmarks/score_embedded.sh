#!/usr/bin/env bash
# The scoring run behind precomputed/smollm2-135m-instruct (background job; re-run it with --resume
# after an interruption). Every choice is also recorded in the artifact's acip.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-precomputed/smollm2-135m-instruct}
RESUME=$([ -f "$OUT/checkpoint.json" ] && echo --resume || true)
.venv/bin/python -m acip_core -v score --model smollm2-135m-instruct --data "${DATA:-corpus:broad}" --out "$OUT" \
  --basis "${BASIS:-whitened}" --batch-size 4 --seq-len 256 --lr 1.5e-4 --reg-init 1e-3 --reg-growth 1.01 \
  --reg-every "${REG_EVERY:-1}" --stop-ratio 0.4 --post-tune-steps "${POST_TUNE:-150}" --steps 1400 \
  --checkpoint-every 25 --eval-windows 0 $RESUME "$@"
