#!/usr/bin/env bash
# The one device call: environment, then bench.py (parity, vision, prefill, decode, W4 transformers baseline,
# engine W1/W2/W4), then the one-GPU FP8 section. Logs and JSON under $OUT; short tables on stdout.
#   bash bench/run_all.sh [7b|3b]        (on the device: PYTHONPATH is set here)
set -u
SHAPE=${1:-7b}
OUT=${OUT:-bench-out}
export PYTHONPATH=.
mkdir -p "$OUT"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"
TOK=()
[ -f .devcarry/tok/tokenizer.json ] && TOK=(--tokenizer .devcarry/tok)
timeout "${BENCH_TIMEOUT:-420}" python bench/bench.py --shape "$SHAPE" --out "$OUT/$SHAPE" "${TOK[@]}" > "$OUT/bench_$SHAPE.log" 2>&1
echo "bench.py rc=$?"; grep -A30 '^| metric' "$OUT/bench_$SHAPE.log" | cut -c1-1500
grep -E "Error|error" "$OUT/bench_$SHAPE.log" | head -20
if [ "${FP8:-1}" = 1 ]; then
  timeout "${FP8_TIMEOUT:-150}" python bench/bench_tp_fp8.py --shape "$SHAPE" --out "$OUT/fp8_$SHAPE" > "$OUT/fp8_$SHAPE.log" 2>&1
  echo "bench_tp_fp8.py rc=$?"; tail -15 "$OUT/fp8_$SHAPE.log"
fi
