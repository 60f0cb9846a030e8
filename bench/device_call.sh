#!/usr/bin/env bash
# One device call that fits whichever card comes (`run` without a kind may give an H100 or an H200):
#   source bench/device_env.sh; bash bench/device_call.sh
# H100: QUICK=1 bench/run_all.sh 7b (the engine's W1-W4 and W1 arms, GPU tests: issue #3's targets are H100's).
# H200: the 72B shape in FP8 on the one card (issue #7: "72B shape fits and runs on one H200 in FP8"), then as
# much of the quick run as the call has left (its numbers are H200's: compare only within the call).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout "${BIG_TIMEOUT:-330}" python bench/bench_tp_engine.py --sections big --big-tp 1 --big-dtype fp8 \
    --big-s "${BIG_S:-300}" --budget "${BIG_S:-300}" --out "$OUT/big72_fp8" > "$OUT/big72_fp8.log" 2>&1
  echo "72B FP8 one H200: rc=$?"; tail -25 "$OUT/big72_fp8.log"
  BENCH_TIMEOUT=150 FP8_TIMEOUT=60 W1_ARMS=bf16_gemv_merge_apart,bf16_gemv_rope_kv,fp8_gemv_rope_kv GPU_TESTS_TIMEOUT=1 \
    QUICK=1 bash bench/run_all.sh 7b
else
  QUICK=1 bash bench/run_all.sh 7b
fi
