#!/usr/bin/env bash
# The recipe's stages one after another in ONE device call (docs/NANO.md §6, "each stage's effect"): runs
# bench/train_nano.sh once per stage, each continuing from the previous stage's model, and brings back every stage's
# model (xz-compressed, <= 16 MiB each: the device returns 8 files of at most 16 MiB) for the eval on the CPU;
# three models and the logs fit what one call brings back.
#   NANO_LADDER="0:70:6 1:85:35 2:110:40" bash bench/nano_ladder.sh   # STAGE:TRAIN_SECONDS:GEN_SECONDS ...
#   NANO_LADDER_INIT=DIR     the first stage's init (default: random weights)
#   NANO_LADDER_KEEP=DIR     where each stage's unpacked model stays (default .ladder, git-ignored): on a warm
#                            machine the next call's NANO_LADDER_INIT=.ladder/s2 finds it there
#   NANO_LADDER_ARMS_<STAGE>="NAME:keys;..."  that stage's NANO_ARMS (default "a:$NANO_LADDER_ARM_KEYS"); its first
#                            arm's model is the next stage's init; every arm's model comes back
#   NANO_LADDER_ARM_KEYS     TrainConfig keys of every default arm (default "compile=true pack_length=131072")
#   NANO_LADDER_ENV_<STAGE>="K=V ..."  extra environment for that stage's train_nano.sh (e.g. NANO_NOISE=0.2)
#   NANO_LADDER_RETURN="2 3 sft"  the stages whose models come back (default: every stage); the others stay in
#                            NANO_LADDER_KEEP only (a rerun of stages already evaluated, or to keep the return small)
# Any other NANO_* setting (NANO_ROPE_THETA, NANO_DATA_WORKERS, ...) passes through to every stage. Each stage gets
# NANO_TOTAL_SECONDS = GEN + TRAIN + 75 (+ 150 for sft: filter, tag, score) and NANO_EVAL_N=0 (no eval on the device).
# $OUT: s<STAGE>[_<ARM>].tar.xz per model (weights and configs; the tokenizer files are qwenvl/nano's) and
# ladder_logs.tar (each stage's summary.json, steps.log, train log). Unpack all: bash bench/nano_ladder.sh unpack DIR.
set -u
if [ "${1:-}" = unpack ]; then  # unpack FILES_AT: every s*.tar.xz into runs/nano/ladder/<name>/, logs in logs/
  for f in "$2"/s*.tar.xz; do
    d=runs/nano/ladder/$(basename "$f" .tar.xz); rm -rf "$d"; mkdir -p "$d"; tar xJf "$f" -C "$d"
    cp -n "$(dirname "$0")/../qwenvl/nano/tokenizer.json" "$(dirname "$0")/../qwenvl/nano/vocab_map.json" "$d"/
  done
  [ -f "$2/ladder_logs.tar" ] && mkdir -p runs/nano/ladder/logs && tar xf "$2/ladder_logs.tar" -C runs/nano/ladder/logs
  ls runs/nano/ladder; exit 0
fi
OUT=${OUT:-ladder-out}; KEEP=${NANO_LADDER_KEEP:-.ladder}; T0=$(date +%s)
LADDER=${NANO_LADDER:?set NANO_LADDER="STAGE:TRAIN_S:GEN_S ..."}
ARM_KEYS=${NANO_LADDER_ARM_KEYS:-compile=true pack_length=131072}
XZ=${NANO_LADDER_XZ_PRESET:-6}  # 0: fast, larger (tests)
for want in ${NANO_LADDER_RETURN:-}; do  # a misspelt stage would silently bring nothing back after a long call
  [[ " $(for spec in $LADDER; do printf '%s ' "${spec%%:*}"; done)" == *" $want "* ]] \
    || { echo "NANO_LADDER_RETURN: stage '$want' is not in NANO_LADDER='$LADDER'" >&2; exit 2; }
done
init=${NANO_LADDER_INIT:-}
WORKROOT=$(mktemp -d /tmp/qwenvl-ladder.XXXXXX)
mkdir -p "$OUT" "$KEEP"
pids=()
for spec in $LADDER; do
  IFS=: read -r stage train gen <<< "$spec"
  case "$stage" in 0|1|2|3|sft|dpo) ;; *) echo "NANO_LADDER: bad stage '$stage' in '$spec'" >&2; exit 2;; esac
  [[ "$train" =~ ^[0-9]+$ && "$gen" =~ ^[0-9]+$ ]] || { echo "NANO_LADDER: '$spec' is not STAGE:TRAIN_S:GEN_S" >&2; exit 2; }
  arms_var=NANO_LADDER_ARMS_$stage; env_var=NANO_LADDER_ENV_$stage
  arms=${!arms_var:-a:$ARM_KEYS}
  total=$(( gen + train + 75 )); [ "$stage" = sft ] && total=$(( total + 150 ))
  so=$WORKROOT/s$stage
  echo "== stage $stage from ${init:-random weights}: train $train s, data $gen s, arms '$arms' ($(( $(date +%s) - T0 )) s so far)"
  # shellcheck disable=SC2086  # the stage's extra K=V words
  env OUT="$so" NANO_STAGE="$stage" NANO_INIT="$init" NANO_TRAIN_SECONDS="$train" NANO_GEN_SECONDS="$gen" \
    NANO_TOTAL_SECONDS="$total" NANO_EVAL_N=0 NANO_ARMS="$arms" ${!env_var:-} bash bench/train_nano.sh \
    > "$WORKROOT/s$stage.log" 2>&1
  echo "   rc=$? $(grep -h '^| training\|^| loss' "$WORKROOT/s$stage.log" | tr '\n' ' ')"
  first=""
  IFS=';' read -ra specs <<< "$arms"
  for a in "${specs[@]}"; do
    name=${a%%:*}; [ -n "$first" ] || first=$name
    tag=s$stage; [ "$name" = "$first" ] || tag=s${stage}_$name  # the first arm is the stage's model
    m=$KEEP/$tag; rm -rf "$m"; mkdir -p "$m"
    if ! ls "$so/$name"/model/*.safetensors > /dev/null 2>&1; then echo "   arm $name: no model" >&2; continue; fi
    cp "$so/$name"/model/*.safetensors "$m"/ && tar xf "$so/$name/$name.tar" -C "$m" ./model/model_files.tar \
      && tar xf "$m/model/model_files.tar" -C "$m" && rm -rf "$m/model"
    [ -z "${NANO_LADDER_RETURN:-}" ] || [[ " $NANO_LADDER_RETURN " == *" $stage "* ]] || continue  # kept in $KEEP only
    # compressed while the next stage runs (bf16 weights: ~70 % of their size at preset 6); the tokenizer files are
    # the pruned vocabulary's, the same as qwenvl/nano's, and are left out (unpack copies them back)
    (cd "$m" && tar cf - --exclude=./tokenizer.json --exclude=./vocab_map.json . \
      | python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.compress(sys.stdin.buffer.read(), preset=$XZ))" \
      > "$OUT/$tag.tar.xz.part" && mv "$OUT/$tag.tar.xz.part" "$OUT/$tag.tar.xz") & pids+=($!)
    # (written under .part, renamed when whole: a call cut off by its timeout brings back no empty archive)
  done
  init=$KEEP/s$stage
  [ -f "$init/config.json" ] || { echo "stage $stage left no model: the ladder stops" >&2; break; }
done
wait "${pids[@]}" 2>/dev/null
(cd "$WORKROOT" && find . -maxdepth 3 \( -name steps.log -o -name 's*.log' -o -name '*.tar' -o -name summary.json \) \
  | sort | tar cf "$OUT/ladder_logs.tar" -T -)
echo "ladder: $(( $(date +%s) - T0 )) s; models kept in $KEEP:"; ls "$KEEP"; ls -la "$OUT"
