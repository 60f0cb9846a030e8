#!/usr/bin/env bash
# The one device call: environment, then bench.py (parity, vision, prefill, decode, W4 transformers baseline,
# engine W1/W2/W4), then the one-GPU FP8 section. Logs and JSON under $OUT; short tables on stdout.
#   bash bench/run_all.sh [7b|3b]        (on the device: PYTHONPATH is set here)
# QUICK=1: the engine only (W1-W4 without the fast-paths check and W5, ~150 s on an H100), then the W1 arms (W1_ARMS:
# bf16 cuBLAS, bf16 / FP8 GEMV; ~13 s each), the fast-paths check on the trained
# nano model taken apart (bench.py fast_paths_ablation, ~150 s), then the single-GPU tests as far as GPU_TESTS_TIMEOUT goes: what one
# short call can settle when machines are hard to get (the seventh session lost most of its device time to failed starts).
set -u
SHAPE=${1:-7b}
OUT=${OUT:-bench-out}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT"
{ date -u +%FT%TZ; git log -1 --format=%h 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"
TOK=()
[ -f .devcarry/tok/tokenizer.json ] && TOK=(--tokenizer .devcarry/tok)
if [ "${QUICK:-0}" = 1 ]; then
  BENCH_SKIP=fast_paths,w5 timeout "${BENCH_TIMEOUT:-200}" python bench/bench.py --shape "$SHAPE" --out "$OUT/$SHAPE" \
    --sections engine "${TOK[@]}" > "$OUT/bench_$SHAPE.log" 2>&1
  echo "bench.py rc=$?"
  python - "$OUT/$SHAPE/results.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1])).get("engine", {})
keys = ("w1_decode_tok_s", "w2_ttft_new_image_ms", "w2_ttft_new_image_2_ms", "w2_ttft_cached_image_ms", "w3_vision_ms",
        "w4_output_tok_s", "w4_output_tok_s_staging_on", "w4_output_tok_s_staging_off", "w4_hooked_output_tok_s", "w1_decode_gaps", "prefill_attention_1281_ms", "decode_attention_b1_ctx1400_us", "stats",
        "decode_attention_b64_ctx600_us")
print(json.dumps({**{k: e.get(k) for k in keys}, **{k: v for k, v in e.items() if k.startswith(("w2_ttft", "w2_other", "w2_of"))}}, indent=1))
PY
  timeout "${FP8_TIMEOUT:-240}" python bench/bench_fp8_gemv.py --shape "$SHAPE" --out "$OUT" --sections engine \
    --variants ${W1_ARMS:-bf16,bf16_gemv,fp8_gemv} --eq-tokens 64 > "$OUT/fp8_gemv.log" 2>&1
  echo "bench_fp8_gemv.py rc=$?"; grep "^W1\|target" "$OUT/fp8_gemv.log"
  # the fast-paths check on the trained nano model taken apart: all fast paths on, each one off alone, the slow run
  # twice more (same batch, 16 per step); fp32 logits throughout (~15 runs of ~10 s)
  BENCH_TRAINED_N=${BENCH_TRAINED_N:-16} timeout "${TRAINED_TIMEOUT:-240}" python bench/bench.py --shape tiny \
    --sections fast_paths_ablation --out "$OUT/trained" > "$OUT/trained.log" 2>&1
  echo "fast_paths_ablation rc=$?"
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['fast_paths_ablation']; print({k: v.get('same_first_32', v.get('error')) for k, v in r.items()})" "$OUT/trained/results.json"
  # the kernels' tests first (the newest changes are there), then the rest as far as the limit goes
  GPU_TEST_FILES=${GPU_TEST_FILES:-"tests/test_fused_ops.py tests/test_engine_cuda.py tests/test_fp8_gemv.py tests/test_vision_cuda.py tests/test_train_cuda.py"} \
    GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-110} bash bench/gpu_tests.sh | tail -3
  exit 0
fi
timeout "${BENCH_TIMEOUT:-420}" python bench/bench.py --shape "$SHAPE" --out "$OUT/$SHAPE" "${TOK[@]}" > "$OUT/bench_$SHAPE.log" 2>&1
echo "bench.py rc=$?"; grep -A30 '^| metric' "$OUT/bench_$SHAPE.log" | cut -c1-1500
grep -E "Error|error" "$OUT/bench_$SHAPE.log" | head -20
if [ "${FP8:-1}" = 1 ]; then
  timeout "${FP8_TIMEOUT:-150}" python bench/bench_tp_fp8.py --shape "$SHAPE" --out "$OUT/fp8_$SHAPE" > "$OUT/fp8_$SHAPE.log" 2>&1
  echo "bench_tp_fp8.py rc=$?"; tail -15 "$OUT/fp8_$SHAPE.log"
fi
