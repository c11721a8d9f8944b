#!/usr/bin/env bash
# lm-eval accuracies of tuned sizes (bf16, the offline tasks), one JSON line each in
# benchmarks/lmeval_tuned.jsonl; compare with the untuned rows of benchmarks/lmeval_sweep.jsonl.
#   benchmarks/lmeval_tuned.sh runs/ft-0.7-lm runs/ft-0.5-lm ...
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=acip_next_sentence,acip_last_word,acip_next_sentence_domain,acip_last_word_domain
for folder in "$@"; do
  .venv/bin/python -m acip_core lm-eval --artifact "$folder" --format bfloat16 --tasks "$tasks" --json 2>/dev/null \
    | tail -1 | .venv/bin/python -c "import json,sys; r=json.load(sys.stdin); r['tuned']=sys.argv[1]; print(json.dumps(r))" "$folder" \
    >> benchmarks/lmeval_tuned.jsonl
done
