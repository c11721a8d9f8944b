#!/usr/bin/env bash
# How much of the held-out domain's gap is the calibration text? An oracle run calibrated on
# corpus:broad plus the first half of Python's help topics, evaluated on their second half, next to the
# same short run on corpus:broad alone (runs/compare-whitened from benchmarks/compare_runs.sh: batch
# 2 x 128, stop at 0.5, no post-tuning). Diagnostic only: the shipped artifact never sees that domain.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/oracle
.venv/bin/python - <<'PY'
from acip_core.sources.data import _corpus_part, load_text
open("runs/oracle/calib.txt", "w").write(load_text("corpus:broad") + "\n\n" + _corpus_part("pydoc", 0.0, 0.5))
open("runs/oracle/domain_b.txt", "w").write(_corpus_part("pydoc", 0.5, 1.0))
PY
if [ ! -f runs/oracle/art/acip.json ] || [ -f runs/oracle/art/checkpoint.json ]; then
  OUT=runs/oracle/art DATA=runs/oracle/calib.txt POST_TUNE=0 benchmarks/score_embedded.sh --stop-ratio 0.5 \
    --batch-size 2 --seq-len 128
fi
rm -rf runs/oracle/base && cp -r runs/compare-whitened runs/oracle/base
for art in runs/oracle/base runs/oracle/art; do
  .venv/bin/python -m acip_core curve --artifact "$art" --methods acip --sizes 0.5:0.9:0.1 --windows 16 \
    --eval heldout=corpus:heldout --eval domain_b=runs/oracle/domain_b.txt --replace >/dev/null
  echo "### $art"; .venv/bin/python benchmarks/curve_table.py --artifact "$art"
done
