#!/usr/bin/env bash
# Scoring-recipe variants against the shipped run, on this CPU, each with its curve on both eval sets
# (float32, 32 windows), into runs/variants/<name>/ (resumable: rerun the script after a kill).
#   kd          the shipped recipe (benchmarks/score_embedded.sh) with --objective kd      (#12)
#   shipped     a copy of precomputed/smollm2-135m-instruct, re-measured the same way
#   short-fp    the recipe with λ growing five times as fast (1.05 a step), stopped at 0.7 with 20
#               post-tune steps: the shorter pair, ~1/4 of the steps (#11, #12)
#   short-int4  short-fp on an int4 base (--base-format int4), transferred to float32 (#11)
#   short-kd    short-fp with --objective kd (#12)
#   benchmarks/score_variants.sh [NAME ...]   (default: short-fp short-int4 short-kd)
set -euo pipefail
cd "$(dirname "$0")/.."
root=runs/variants
mkdir -p "$root"
curve() {  # curve <folder> <sizes LO:HI:STEP>  (once: curve.done marks it measured)
  [ -f "$1/curve.done" ] && return 0
  .venv/bin/python -m acip_core curve --artifact "$1" --methods acip --sizes "$2" --windows 32 --formats float32 \
    --replace > "$1/curve.log" 2>&1
  touch "$1/curve.done"
}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(short-fp short-int4 short-kd)
for name in "${names[@]}"; do
  out=$root/$name
  case $name in
    shipped) [ -f "$out/acip.json" ] || { mkdir -p "$out"; cp precomputed/smollm2-135m-instruct/{acip.json,scores.safetensors,adapters.safetensors,curve.csv} "$out"/; }
             curve "$out" 0.4:0.9:0.1 ;;
    kd)      [ -f "$out/acip.json" ] || OUT=$out benchmarks/score_embedded.sh --objective kd > "$root/$name.log" 2>&1
             curve "$out" 0.4:0.9:0.1 ;;
    short-fp|short-int4|short-kd)
             extra=(); [ "$name" = short-int4 ] && extra=(--base-format int4)
             [ "$name" = short-kd ] && extra=(--objective kd)
             [ -f "$out/acip.json" ] || OUT=$out POST_TUNE=20 benchmarks/score_embedded.sh --stop-ratio 0.7 \
               --reg-growth 1.05 "${extra[@]}" > "$root/$name.log" 2>&1
             curve "$out" 0.7:0.9:0.1 ;;
    *) echo "unknown variant $name" >&2; exit 2 ;;
  esac
  echo "$(date -u +%H:%M:%S) $name done" >> "$root/done.txt"
done
