#!/usr/bin/env bash
# Peak memory per process of a short scoring run on the embedded SmolLM2 (CPU, gloo): one process,
# 2 processes replicated (DDP-style), 2 processes sharded (--fsdp: only rank 0 reads the weights and
# builds the basis, rank 1 starts on the meta device). Prints each rank's "peak RSS" log line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARGS=(score --model smollm2-135m-instruct --basis whitened --steps 3 --post-tune-steps 0 --batch-size 2
      --seq-len 128 --eval-windows 0 --json)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
echo "one process:"
/usr/bin/time -f "  peak RSS %M KiB" $PY -m acip_core "${ARGS[@]}" --out "$OUT/single" > /dev/null
for mode in replicated fsdp; do
  echo "2 processes, $mode:"
  extra=(); [ "$mode" = fsdp ] && extra=(--fsdp)
  $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m acip_core -v "${ARGS[@]}" "${extra[@]}" \
      --out "$OUT/$mode" 2>&1 >/dev/null | grep -E "peak RSS|frozen values" | sed 's/^.*distributed: /  /'
done
