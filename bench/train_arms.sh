#!/usr/bin/env bash
# Issue #5's training throughput arms in one device call (3B shape, rows packed to 8192, ViT frozen, random weights):
#   source bench/device_env.sh; bash bench/train_arms.sh
# TRAIN_ARMS: ';'-separated `name:flags of python -m qwenvl.train.bench`; the first arm is the previous best (the
# baseline of the call), PROFILE_ARM (a name) runs with QWENVL_PROFILE_STEP=$PROFILE_STEP (that step is left out of
# its timing) and prints the profiler's table. Logs and JSON under $OUT/train; a table on stdout.
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT/train"
export PYTHONPATH=${PYTHONPATH:-.}
ARMS=${TRAIN_ARMS:-"ck22:--compile --checkpoint-layers 22;nock:--compile --no-checkpointing;nock_ga4:--compile --no-checkpointing --grad-accum 4 --steps 6"}
IFS=';' read -ra LIST <<< "$ARMS"
for arm in "${LIST[@]}"; do
  name=${arm%%:*}; flags=${arm#*:}
  prof=0; [ "$name" = "${PROFILE_ARM:-}" ] && prof=${PROFILE_STEP:-7}
  # shellcheck disable=SC2086
  QWENVL_PROFILE_STEP=$prof timeout "${ARM_TIMEOUT:-170}" "${PY:-python3}" -m qwenvl.train.bench --preset "${PRESET:-3b}" --steps 9 \
    --freeze-vit $flags > "$OUT/train/$name.log" 2>&1
  echo "$name rc=$?"
  tail -1 "$OUT/train/$name.log" | grep '^{' > "$OUT/train/$name.json" || tail -5 "$OUT/train/$name.log"
  [ "$prof" != 0 ] && grep -A45 "profiled step" "$OUT/train/$name.log" | cut -c1-180
done
"${PY:-python3}" - "$OUT/train" "${LIST[@]}" <<'PY'
import json, os, sys
print("| arm | tokens/s | MFU | step s | peak GB | steps s |")
print("|---|---:|---:|---:|---:|---|")
for arm in sys.argv[2:]:
    name = arm.split(":", 1)[0]
    try:
        r = json.load(open(os.path.join(sys.argv[1], name + ".json")))
    except Exception as e:  # an arm that failed (OOM, timeout) says so
        print(f"| {name} | failed ({type(e).__name__}) | | | | |"); continue
    print(f"| {name} | {r['tokens_per_s']:,.0f} | {100 * (r['mfu'] or 0):.1f} % | {r['step_s']:.3f} | "
          f"{r['peak_memory_gb']:.1f} | {r['step_s_all']} |")
PY
