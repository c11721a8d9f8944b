#!/usr/bin/env bash
# Fine-tunes sizes of the shipped artifact, one run at a time (niced), and prints the comparison table
# of benchmarks/RESULTS.md "Fine-tuning a chosen size". Each run lands in runs/ft-<size>-<objective>/
# (tuned.json holds its figures); rerunning resumes unfinished runs and skips finished ones.
#   SIZES="0.7 0.5" OBJECTIVES="kd lm lm+kd" STEPS=60 BATCH=4 benchmarks/finetune_sizes.sh
#   FORMAT=int4 SIZES=0.7 OBJECTIVES=kd benchmarks/finetune_sizes.sh   # frozen factors in int4 (-> runs/ft-0.7-kd-int4)
#   TAG=s85 STEPS=85 SIZES=0.8 OBJECTIVES=lm+kd benchmarks/finetune_sizes.sh  # another run of a pair (-> runs/ft-0.8-lm+kd-s85)
#   DATA=corpus:handbook-train TAG=handbook ...    # another fine-tuning text (default corpus:broad)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ART=precomputed/smollm2-135m-instruct
SIZES=${SIZES:-"0.7 0.5"}
OBJECTIVES=${OBJECTIVES:-"kd lm lm+kd"}
STEPS=${STEPS:-60}
BATCH=${BATCH:-4}
WINDOWS=${WINDOWS:-32}
SEQ=${SEQ:-256}
LR=${LR:-2e-4}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for size in $SIZES; do
  for obj in $OBJECTIVES; do
    out=runs/ft-$size-$obj${FORMAT:+-$FORMAT}${TAG:+-$TAG}
    [ -f $out/tuned.json ] && [ ! -f $out/checkpoint.json ] && continue
    nice -n 10 $PY -m acip_core -v finetune --artifact $ART --size-ratio $size --data ${DATA:-corpus:broad} \
      --steps $STEPS --batch-size $BATCH --seq-len $SEQ --lr $LR --checkpoint-every ${CKPT:-25} --objective $obj --eval-windows $WINDOWS --out $out --resume \
      --format ${FORMAT:-float32}
  done
done
if [ ! -f runs/ft-original.json ]; then  # the original, measured like the tuned sizes (float32, same windows)
  h=$(nice -n 10 $PY -m acip_core eval --artifact $ART --size-ratio 1.0 --data corpus:heldout --max-windows $WINDOWS --json)
  d=$(nice -n 10 $PY -m acip_core eval --artifact $ART --size-ratio 1.0 --data corpus:domain --max-windows $WINDOWS --json)
  mkdir -p runs
  $PY -c "import json,sys; print(json.dumps({'heldout': json.loads(sys.argv[1])['perplexity'], 'domain': json.loads(sys.argv[2])['perplexity']}))" "$h" "$d" > runs/ft-original.json
fi
$PY benchmarks/finetune_table.py runs/ft-original.json runs/ft-*/
