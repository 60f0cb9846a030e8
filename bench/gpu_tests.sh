#!/usr/bin/env bash
# Every GPU-marked test in one device call, with a log and JUnit XML under $OUT (125 s on an H100 on 2026-12-05,
# before the compiled decoder ops became the default: each engine now compiles them, hence the 540 s limit):
#   source bench/device_env.sh && bash bench/gpu_tests.sh        (carry ".devcarry" for the tokenizer wheel)
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
timeout "${GPU_TESTS_TIMEOUT:-540}" "${PY:-python3}" -m pytest -m gpu -q -rfEs --durations=10 --junitxml="$OUT/gpu_tests.xml" \
  ${GPU_TEST_FILES:-tests/test_engine_cuda.py tests/test_vision_cuda.py tests/test_train_cuda.py tests/test_fp8_gemv.py} "$@" \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -40
