#!/usr/bin/env bash
# Issue 6's OCR question on the GPU (docs/NANO.md §7, "OCR"): several bench/nano_probe.py reading probes at once on
# one card, each for PROBE_TRAIN_SECONDS (200) of training (many times the CPU probe's steps), their JSON results
# and loss curves under $OUT/probes:
#   source bench/device_env.sh && bash bench/reading_probes.sh
# PROBES overrides the list: "NAME:args;NAME2:args" (each args go to nano_probe.py after the common ones).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT/probes"
TRAIN_S=${PROBE_TRAIN_SECONDS:-200}; LIMIT=${PROBE_SECONDS:-320}
COMMON="--train-seconds $TRAIN_S --pack-length ${PROBE_PACK:-8192} --samples ${PROBE_SAMPLES:-20000} --heldout 200 --data-workers ${PROBE_WORKERS:-5}"
# (without data workers, 2026-12-06: 47 steps of 8,192 tokens in 200 s, ~11 ms of host work per sample)
PROBES=${PROBES:-"char_latest:--task char --size 112 --font-size 24 --model runs/nano/latest;char_random:--task char --size 112 --font-size 24;word_latest:--task word --size 224 --font-size 24 --model runs/nano/latest"}
IFS=';' read -ra LIST <<< "$PROBES"
for spec in "${LIST[@]}"; do
  name=${spec%%:*}; args=${spec#*:}
  # shellcheck disable=SC2086
  timeout "$LIMIT" env QWENVL_COMPILE_OPS=0 QWENVL_COMPILE_VIT=0 "${PY:-python3}" bench/nano_probe.py $COMMON $args --out "/tmp/probe-$name" \
    --json "$OUT/probes/$name.json" > "$OUT/probes/$name.log" 2>&1 &
done
wait
printf '| probe | held-out exact | char acc | loss (first -> last 10-step mean) | train s |\n|---|---:|---:|---|---:|\n'
for spec in "${LIST[@]}"; do
  name=${spec%%:*}
  "${PY:-python3}" - "$OUT/probes/$name.json" "$name" <<'PY' || echo "| $name | failed: see probes/$name.log |"
import json, sys
r = json.load(open(sys.argv[1])); c = r["loss_means_per_10_steps"]
print(f"| {sys.argv[2]} | {r['held_out_accuracy']:.3f} | {r.get('char_accuracy', float('nan')):.3f} | "
      f"{c[0]} -> {c[-1]} | {r['train_s']} |")
PY
done
