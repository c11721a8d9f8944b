#!/usr/bin/env bash
# lm-eval accuracies of tuned sizes against the same sizes untuned (the offline tasks, one dtype for
# both), one JSON line each in benchmarks/results/lmeval_tuned.jsonl ("tuned": the folder, or null for the
# untuned size of the parent artifact). Table: python benchmarks/lmeval_table.py benchmarks/results/lmeval_tuned.jsonl
#   [DTYPE=float32] benchmarks/lmeval_tuned.sh precomputed/smollm2-135m-instruct/tuned/0.7 ...
# float32 by default: on CPUs without bf16 instructions (avx2 only) a bf16 forward of 8 x 200 tokens
# takes ~80 s against ~1 s in float32 (benchmarks/RESULTS.md), so bf16 rows are for bf16 machines.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=acip_next_sentence,acip_last_word,acip_next_sentence_domain,acip_last_word_domain
dtype=${DTYPE:-float32}
out=benchmarks/results/lmeval_tuned.jsonl
tag() {  # adds the tuned folder (or null) and the dtype to lm-eval's JSON line
  .venv/bin/python -c "import json,sys; r=json.load(sys.stdin); r['tuned']=sys.argv[1] or None; r['dtype']=sys.argv[2]; print(json.dumps(r))" "$1" "$dtype"
}
for folder in "$@"; do
  ratio=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]+'/tuned.json'))['size']['size_ratio'])" "$folder")
  parent=$(dirname "$(dirname "$folder")")  # <artifact>/tuned/<ratio>
  .venv/bin/python -m acip_core lm-eval --artifact "$parent" --size-ratio "$ratio" --format "$dtype" --tasks "$tasks" \
    --json 2>/dev/null | tail -1 | tag "" >> "$out"
  .venv/bin/python -m acip_core lm-eval --artifact "$folder" --format "$dtype" --tasks "$tasks" --json 2>/dev/null \
    | tail -1 | tag "$folder" >> "$out"
done
