#!/usr/bin/env bash
# Memory of scoring on a float32 / int8 / int4 base (issue 11): a few steps of the shipped recipe each,
# one after the other, into /tmp; prints each run's largest RSS after a step and peak RSS within a step
# (train.memory_fields). Figures in MiB; run on an otherwise idle machine for timings, any time for memory.
#   [BASES="float32 int4"] benchmarks/base_memory.sh [STEPS]   (default 4; all three bases)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
for base in ${BASES:-float32 int8 int4}; do
  out=$(mktemp -d)/run
  OUT=$out POST_TUNE=0 benchmarks/score_embedded.sh --steps "$steps" --base-format "$base" > "$out.log" 2>&1 || {
    tail -5 "$out.log"; exit 1; }
  .venv/bin/python - "$base" "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2] + "/log.jsonl")]
print(f"{sys.argv[1]:8s} steps {len(rows)}  RSS after a step (max) {max(r['rss_mib'] for r in rows)} MiB  "
      f"peak within a step (max) {max(r['step_peak_mib'] for r in rows)} MiB  "
      f"s/step {rows[-1]['seconds'] / len(rows):.1f}")
PY
  rm -rf "$(dirname "$out")"
done
