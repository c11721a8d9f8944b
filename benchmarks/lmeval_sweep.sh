#!/usr/bin/env bash
# lm-eval accuracies of ACIP and the best baseline (block removal) at sizes 0.4..1.0, through lm-eval's
# own harness on the in-memory model; one JSON object per line in benchmarks/results/lmeval_sweep.jsonl.
#   [METHODS="acip"] benchmarks/lmeval_sweep.sh [TASKS] [DTYPE]
# METHODS (default: both) re-measures only those methods; the other methods' lines are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-acip_next_sentence,acip_last_word,acip_next_sentence_domain,acip_last_word_domain}
dtype=${2:-bfloat16}
out=benchmarks/results/lmeval_sweep.jsonl
methods=${METHODS:-acip block-removal}
if [ -f "$out" ]; then  # keep the lines of the methods not re-measured
  pattern=$(printf '"method": "%s"|' $methods); grep -Ev "${pattern%|}" "$out" > "$out.keep" || true
  mv "$out.keep" "$out"
fi
for method in $methods; do
  for r in 1.0 0.9 0.8 0.7 0.6 0.5 0.4; do
    [ "$method" = block-removal ] && [ "$r" = 1.0 ] && continue  # the same model as ACIP at 1.0
    .venv/bin/python -m acip_core lm-eval --artifact precomputed/smollm2-135m-instruct --method "$method" \
      --size-ratio "$r" --format "$dtype" --tasks "$tasks" --json 2>/dev/null | tail -1 >> "$out"
  done
done
