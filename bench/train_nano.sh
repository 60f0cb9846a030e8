#!/usr/bin/env bash
# qwenvl-nano from scratch in ONE device call (docs/NANO.md §6), every step under `timeout`, all within
# NANO_TOTAL_SECONDS (555 s; packaging gets >= 15 s even past it):
#   (a) synthetic training data on NANO_GEN_WORKERS processes for NANO_GEN_SECONDS (NANO_STAGE's token mix) + the eval
#       suite's held-out set, merged into one shuffled train.jsonl;
#   (b) `qwenvl train` (qwenvl.train.cli) of the nano preset from random weights for NANO_TRAIN_SECONDS of wall
#       clock (max_train_seconds: cosine over the budget, then save + export), data_workers processes feeding it;
#   (c) `qwenvl eval --suite nano --n NANO_EVAL_N` on the exported model;
#   (d) $OUT: model/*.safetensors (bf16, <= 15 MB each) + model/model_files.tar (config, tokenizer, processor),
#       train_log.jsonl, eval_report.json, eval_predictions.jsonl, summary.json, steps.log (8 files at most).
#   bash bench/train_nano.sh                 # on the device (OUT is set there)
#   NANO_SMOKE=1 OUT=/tmp/o bash bench/train_nano.sh    # CPU dry run of the same steps in about a minute
#   NANO_DRY_RUN=1 bash bench/train_nano.sh            # only print each step's command and time limit (writes nothing)
#   NANO_INIT=DIR bash bench/train_nano.sh             # continue from an exported model (weights + tokenizer) instead of random
#   NANO_STAGE=1 NANO_INIT=DIR bash bench/train_nano.sh   # stage 1 of docs/NANO.md §4: ViT + merger trained, LLM frozen,
#                                                         # the stage-1 mix (captions, OCR, spotting, grounding, charts)
#   NANO_MROPE_TEMPORAL=frame bash bench/train_nano.sh    # the ablation: frame-index video temporal ids (NANO.md §4)
#   NANO_VIDEO_FPS=dynamic bash bench/train_nano.sh       # clips sampled at 1, 2 or 4 fps (dynamic FPS; default 2)
#   NANO_STAGE=3 NANO_INIT=DIR bash bench/train_nano.sh   # long context: 30-120 s clips + the stage-2 mix
#   NANO_STAGE=0 bash bench/train_nano.sh                 # text only (synth.text: copying, answer formats), LLM trains
#   NANO_STAGE=sft NANO_INIT=DIR bash bench/train_nano.sh # SFT on the curated stage-2 mix (data filter + score), ViT frozen
#   NANO_STAGE=dpo NANO_INIT=DIR bash bench/train_nano.sh # DPO on pairs of the stage-2 mix (qwenvl data pairs), ViT frozen
#   NANO_ARMS="a:;b:rope_theta=100" bash bench/train_nano.sh   # several trainings at once on the same data (see (b))
#   NANO_STAGE=sft NANO_NOISE=0.2 NANO_ARMS="c:;u:train_files=[{data}/train.jsonl]" ...  # 20 % flawed answers
#       (cut off, looping, broken boxes); arm c trains on the curated set, arm u on the raw one ({data}: the call's data)
#   NANO_MIX=video NANO_ARMS="A:model=DIR_A;F:model=DIR_F" ... # clips only (the temporal-id ablation), per-arm inits
#   NANO_MIX=spatial NANO_INIT=DIR bash bench/train_nano.sh  # grounding, point, count, GUI at 75 % of the tokens
#   NANO_MIX=reading NANO_INIT=DIR bash bench/train_nano.sh  # OCR, spotting, KIE, GUI at 65 %, the position tasks held at 20 %
#   NANO_MIX=glyphs NANO_INIT=DIR bash bench/train_nano.sh   # random character strings 25 % (the reading curriculum)
#   NANO_MIX=glyphs_fonts NANO_INIT=DIR bash bench/train_nano.sh  # the same at 20 %, count 10 %, copy texts 8 %
#   QWENVL_PROFILE_STEP=20 bash bench/train_nano.sh     # + torch.profiler tables of training step 20 in steps.log
# Every call evaluates the suite after its stage, plus the clips sampled at fps unseen in training
# (video_grounding_unseen_fps, dense_caption_unseen_fps; NANO_EVAL_UNSEEN_FPS=0 leaves them out) and single-line OCR
# (ocr_single_line);
# NANO_DATA_SEED picks other synthetic samples (the same seed regenerates the same ones: give each call its own).
# Unpack the model: mkdir m && cp $OUT/model/*.safetensors m/ && tar xf $OUT/model/model_files.tar -C m
set -u
T0=$(date +%s)
OUT=${OUT:-nano-out}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DRY=${NANO_DRY_RUN:-0}
STAGE=${NANO_STAGE:-2}; MROPE=${NANO_MROPE_TEMPORAL:-}; UNSEEN=${NANO_EVAL_UNSEEN_FPS:-1}
case "$STAGE" in 0|1|2|3|sft|dpo) ;; *) echo "NANO_STAGE must be 0, 1, 2, 3, sft or dpo, got $STAGE" >&2; exit 2;; esac
case "$MROPE" in ""|absolute|frame) ;; *) echo "NANO_MROPE_TEMPORAL must be absolute or frame, got $MROPE" >&2; exit 2;; esac
MIX=${NANO_MIX:-}  # video: clips only (the temporal-id ablation), evaluated on the video tasks only; spatial: the
# position-reading tasks at 75 % of the tokens (nano_recipe.py MIX_SPATIAL); reading: OCR, spotting, KIE and GUI at
# 65 % (MIX_READING); glyphs: random character strings at 25 % (MIX_GLYPHS); all three evaluated on every task
case "$MIX" in ""|video|spatial|reading|glyphs|glyphs_fonts) ;; *) echo "NANO_MIX must be empty, video, spatial, reading, glyphs or glyphs_fonts, got $MIX" >&2; exit 2;; esac
if [ -n "$MIX" ] && [ "$STAGE" != 2 ]; then echo "NANO_MIX=$MIX replaces stage 2's mix; NANO_STAGE=$STAGE has its own" >&2; exit 2; fi
VIDEO_FPS=${NANO_VIDEO_FPS:-2}  # dynamic: training clips at 1, 2 or 4 fps (the report's dynamic FPS sampling)
case "$VIDEO_FPS" in 2|dynamic) ;; *) echo "NANO_VIDEO_FPS must be 2 or dynamic, got $VIDEO_FPS" >&2; exit 2;; esac
if [ "${NANO_SMOKE:-0}" = 1 ]; then
  export QWENVL_SYNTH_VIDEO=${QWENVL_SYNTH_VIDEO:-frames}  # as on the device, which has no PyAV
  D_TOTAL=150 D_GEN=2 D_GEN_WORKERS=2 D_ROUND=1500 D_TRAIN=3 D_DATA_WORKERS=1 D_EVAL_N=1 D_DEVICE=cpu D_PACK=2048
  D_ACCUM=1 D_WARMUP=2 D_EVAL_TIMEOUT=60 D_EVAL_ARGS="--max-tokens 4 --backend generate --tasks grounding,chart"
  D_SCORE_RECORDS=40
else
  # eval: 95 s for the 11 suite tasks (n=50), +20 s for the 2 unseen-fps video tasks
  D_TOTAL=555 D_GEN=75 D_GEN_WORKERS=14 D_ROUND=100000 D_TRAIN=330 D_DATA_WORKERS=14 D_EVAL_N=50 D_DEVICE=cuda
  D_PACK=4096 D_ACCUM=4 D_WARMUP=30 D_EVAL_TIMEOUT=$(( UNSEEN == 1 ? 115 : 95 )) D_EVAL_ARGS="--batch-size 64 --max-tokens 448"
  D_SCORE_RECORDS=4000
fi
UNSEEN_TASKS=video_grounding_unseen_fps,dense_caption_unseen_fps
[ "$UNSEEN" = 1 ] || UNSEEN_TASKS=""
# and issue 6's OCR target, single lines, at full n (synth ocr_single_line: the OCR images with their first line)
[ "$MIX" = video ] || UNSEEN_TASKS="${UNSEEN_TASKS:+$UNSEEN_TASKS,}ocr_single_line"
# the glyph curriculum's held-out strings (scored as OCR): whether the glyphs themselves are being read
case "$MIX" in glyphs|glyphs_fonts) UNSEEN_TASKS="$UNSEEN_TASKS,glyphs";; esac
[ "$MIX" = video ] && D_EVAL_ARGS="$D_EVAL_ARGS --tasks video_grounding,dense_caption"  # + the unseen-fps ones
# stage 3 (long context: 30-120 s clips, the stage-3 mix of nano_recipe.py) also evaluates held-out long clips
if [ "$STAGE" = 3 ]; then
  UNSEEN_TASKS="${UNSEEN_TASKS:+$UNSEEN_TASKS,}video_grounding_long,dense_caption_long"
  D_PACK=$(( D_PACK > 8192 ? D_PACK : 8192 ))  # a long clip is up to ~4.6 k tokens (§4: 8192 rows in stage 3)
  D_EVAL_TIMEOUT=$(( D_EVAL_TIMEOUT + 20 ))  # 100 more clips of ~3 k prompt tokens (an estimate, not measured)
fi
STAGE_ARGS=""  # stage 1: ViT + merger, LLM frozen (TrainConfig.freeze_llm); stage 2: everything trains
[ "$STAGE" = 1 ] && STAGE_ARGS="freeze_llm=true"
# stage 0: text only (synth.text), the LLM trains; the eval is a short format check on two vision tasks
if [ "$STAGE" = 0 ]; then
  STAGE_ARGS="freeze_vit=true freeze_merger=true"; UNSEEN_TASKS=""; D_EVAL_N=$(( D_EVAL_N < 10 ? D_EVAL_N : 10 ))
  D_EVAL_ARGS="$D_EVAL_ARGS --tasks grounding,video_grounding"; D_EVAL_TIMEOUT=45
  # text is generated at ~40 k records/s per process (2 processes made 150 k, 9 M tokens, in 2 s on the dev box):
  # 6 s on 14 processes is already more than one call trains on
  [ "${NANO_SMOKE:-0}" = 1 ] || D_GEN=6
fi
# dpo: the stage-2 mix made into preference pairs (qwenvl data pairs: the answer vs a corrupted copy that fails the
# task's metric), DPO loss against a frozen copy of NANO_INIT, ViT frozen (NANO.md §4); lr 1e-5 unless NANO_LR
LOSS=sft; TRAIN_FILE=train.jsonl; DATA_STAGE=$STAGE; D_LR=1e-3
if [ "$STAGE" = dpo ]; then
  [ -n "${NANO_INIT:-}" ] || { echo "NANO_STAGE=dpo needs NANO_INIT (the model to align)" >&2; exit 2; }
  LOSS=dpo; TRAIN_FILE=pairs.jsonl; DATA_STAGE=2; D_LR=1e-5
  [ "${NANO_SMOKE:-0}" = 1 ] || D_GEN=25  # ~20 k records -> pairs in ~25 s (§4 plans ~10 k pairs)
  [ "${NANO_SMOKE:-0}" = 1 ] && D_PACK=4096  # a pair is packed whole: twice a sample's length
  STAGE_ARGS="freeze_vit=true freeze_merger=true dpo_beta=${NANO_DPO_BETA:-0.1}"
fi
# sft: the stage-2 mix curated with the report's tools (qwenvl data filter: rules; tag: domains; score: NANO_INIT's
# log-likelihood, the least likely 5 % of each domain dropped), then LLM + merger trained with the ViT frozen
# (NANO.md §4); lr 2e-4 unless NANO_LR
if [ "$STAGE" = sft ]; then
  [ -n "${NANO_INIT:-}" ] || { echo "NANO_STAGE=sft needs NANO_INIT (the pretrained model to fine-tune)" >&2; exit 2; }
  TRAIN_FILE=sft.jsonl; DATA_STAGE=2; D_LR=2e-4; STAGE_ARGS="freeze_vit=true"
  [ "${NANO_SMOKE:-0}" = 1 ] || D_GEN=60  # room for the curation steps (~40 s of filter + score, an estimate)
fi
[ -n "$MROPE" ] && STAGE_ARGS="$STAGE_ARGS mrope_temporal=$MROPE"  # unset: the init's (a preset: absolute)
# the LLM's RoPE base, from random weights only (NANO.md §7: MRoPE gives the width axis the lowest frequencies)
[ -n "${NANO_ROPE_THETA:-}" ] && STAGE_ARGS="$STAGE_ARGS rope_theta=$NANO_ROPE_THETA"
if [ "$STAGE" = 1 ] && [ -z "${NANO_INIT:-}" ]; then
  echo "warning: NANO_STAGE=1 without NANO_INIT trains the ViT + merger against a frozen RANDOM LLM" >&2
fi
if [ "$STAGE" = 3 ] && [ -z "${NANO_INIT:-}" ]; then
  echo "warning: NANO_STAGE=3 without NANO_INIT starts long-context training from RANDOM weights" >&2
fi
TOTAL=${NANO_TOTAL_SECONDS:-$D_TOTAL}
GEN=${NANO_GEN_SECONDS:-$D_GEN}; GEN_WORKERS=${NANO_GEN_WORKERS:-$D_GEN_WORKERS}; ROUND=${NANO_ROUND_TOKENS:-$D_ROUND}
TRAIN=${NANO_TRAIN_SECONDS:-$D_TRAIN}; DATA_WORKERS=${NANO_DATA_WORKERS:-$D_DATA_WORKERS}
PACK=${NANO_PACK_LENGTH:-$D_PACK}; ACCUM=${NANO_GRAD_ACCUM:-$D_ACCUM}; WARMUP=${NANO_WARMUP_STEPS:-$D_WARMUP}
LR=${NANO_LR:-$D_LR}; DEVICE=${NANO_DEVICE:-$D_DEVICE}
EVAL_N=${NANO_EVAL_N:-$D_EVAL_N}; EVAL_TIMEOUT=${NANO_EVAL_TIMEOUT:-$D_EVAL_TIMEOUT}; EVAL_ARGS=${NANO_EVAL_ARGS-$D_EVAL_ARGS}
# NANO_EVAL_N=0: no suite and no eval in this call (training gets the eval's reserve too); evaluate the returned model
# elsewhere, e.g. on the CPU: `qwenvl eval --model M --suite nano --n 100 --dtype float32 ...` (docs/NANO.md §6)
[ "$EVAL_N" = 0 ] && { EVAL_TIMEOUT=0; UNSEEN_TASKS=""; }
if [ "$DRY" = 1 ]; then WORK=${NANO_WORK:-/tmp/qwenvl-nano.WORK}; else WORK=${NANO_WORK:-$(mktemp -d /tmp/qwenvl-nano.XXXXXX)}; fi
LOG="$OUT/steps.log"
if [ "$DRY" != 1 ]; then mkdir -p "$OUT" "$WORK"; : > "$LOG"; fi
# the synth fonts of this machine: runs 1-18 drew in Pillow's built-in font alone without knowing it (NANO.md §7)
if [ "$DRY" != 1 ]; then
  FONTS=$("$PY" -c "from qwenvl.synth.common import font_names; print(' '.join(font_names()))")
  echo "synth fonts: $FONTS" | tee -a "$LOG"
  [ "$FONTS" = pil-default ] && echo "warning: synth has only Pillow's built-in font here: carry .devcarry/fonts" \
    "(bench/devcarry.sh) and source bench/device_env.sh, or the data is drawn in one font" | tee -a "$LOG" >&2
fi
left() { echo $(( T0 + TOTAL - $(date +%s) )); }
cap() { local l=$(( $(left) - $2 )); local v=$(( $1 < l ? $1 : l )); echo $(( v > 1 ? v : 1 )); }  # min(want, left - reserve)
step() {  # step NAME SECONDS cmd...: run under timeout, log to $WORK/NAME.log, append its tail to steps.log
  local name=$1 limit=$2 s=$(date +%s); shift 2
  if [ "$DRY" = 1 ]; then printf '%s (limit %s s):' "$name" "$limit"; printf ' %q' "$@"; echo; return 0; fi
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - s ))
  echo "$name=$dt" >> "$WORK/times.txt"
  { echo "== $name: rc=$rc in $dt s (limit $limit s)"; tail -n 25 "$WORK/$name.log"; } >> "$LOG"
  echo "$name: rc=$rc, $dt s (limit $limit s)"
  return $rc
}
[ "$DRY" = 1 ] || { date -u +%FT%TZ; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null; nproc
  $PY -c "import torch, tokenizers, safetensors, yaml; print('torch', torch.__version__)"; } >> "$LOG" 2>&1

# NANO_ARMS (see (b)), parsed before any work
ARM_NAMES=(""); ARM_ARGS=("")
if [ -n "${NANO_ARMS:-}" ]; then
  ARM_NAMES=(); ARM_ARGS=()
  IFS=';' read -ra SPECS <<< "$NANO_ARMS"
  for spec in "${SPECS[@]}"; do
    name=${spec%%:*}; args=""; [ "$name" != "$spec" ] && args=${spec#*:}
    if ! [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]]; then echo "NANO_ARMS: bad arm name '$name' in '$spec' (letters, digits, _ -)" >&2; exit 2; fi
    ARM_NAMES+=("$name"); ARM_ARGS+=("$args")
  done
fi
N_ARMS=${#ARM_NAMES[@]}
ARM_WORKERS=$(( DATA_WORKERS / N_ARMS > 1 ? DATA_WORKERS / N_ARMS : 1 ))
ARM_KV=""; [ "$N_ARMS" -gt 1 ] && [ "$DEVICE" = cuda ] && ARM_KV="--kv-cache-mb 4096"

# (a) data: generation ends at its own deadline (+ ~10 s to start and merge); `timeout` is the backstop
step data $(( GEN + 30 )) \
  $PY bench/nano_recipe.py data --out "$WORK/data" --workers "$GEN_WORKERS" --seconds "$GEN" \
  --round-tokens "$ROUND" --suite-n "$EVAL_N" --suite-root "$WORK/suites" --suite-extra "$UNSEEN_TASKS" \
  --stage "$DATA_STAGE" ${MIX:+--mix $MIX} --video-fps "$VIDEO_FPS" --seed "${NANO_DATA_SEED:-0}" \
  ${NANO_NOISE:+--noise $NANO_NOISE}
if [ "$STAGE" = sft ]; then  # a failed or timed-out curation step passes its input on as it is
  step filter 60 $PY -m qwenvl.data.cli filter "$WORK/data/train.jsonl" --out "$WORK/data/filtered.jsonl" \
    --report "$WORK/data/filter_report.json" --removed "$WORK/data/removed.jsonl" --max-pixels 200704 \
    || { [ "$DRY" = 1 ] || cp "$WORK/data/train.jsonl" "$WORK/data/filtered.jsonl"; }
  # scored: the first NANO_SCORE_RECORDS of the shuffled records (one process encodes ~5-10 ms a record; rows of
  # 16 k tokens per forward pass), the rest kept unscored
  step tag 30 $PY -m qwenvl.data.cli tag "$WORK/data/filtered.jsonl" --out "$WORK/data/tagged.jsonl" \
    --report "$WORK/data/tag_report.json" \
    || { [ "$DRY" = 1 ] || cp "$WORK/data/filtered.jsonl" "$WORK/data/tagged.jsonl"; }
  step score "${NANO_SCORE_SECONDS:-75}" $PY -m qwenvl.data.cli score "$WORK/data/tagged.jsonl" \
    --out "$WORK/data/sft.jsonl" --report "$WORK/data/score_report.json" --model "$NANO_INIT" --device "$DEVICE" \
    --drop-fraction 0.05 --max-records "${NANO_SCORE_RECORDS:-$D_SCORE_RECORDS}" \
    || { [ "$DRY" = 1 ] || cp "$WORK/data/tagged.jsonl" "$WORK/data/sft.jsonl"; }
fi
[ "$STAGE" = dpo ] && step pairs 90 $PY -m qwenvl.data.cli pairs "$WORK/data/train.jsonl" --out "$WORK/data/pairs.jsonl" \
  --report "$WORK/data/pairs_report.json" --seed "${NANO_DATA_SEED:-0}"

# (b) train: at most NANO_TRAIN_SECONDS, less when (a) ran long: eval's limit + ~45 s (training start and export
# ~25 s, packaging ~10 s) must stay; `timeout` gives training 50 s beyond its budget as a backstop.
# NANO_ARMS runs several trainings at once on the same data and GPU (the nano model keeps an H100/H200 ~1 % busy):
# "NAME:key=value key=value;NAME2:..." (TrainConfig keys added to the arm's command); data workers are split
# between the arms; each arm's eval gets its own small KV cache, and its files go to $OUT/NAME/.
TRAIN_S=$(cap "$TRAIN" $(( EVAL_TIMEOUT + 45 )))
arm_dir() { echo "${1:+_$1}"; }  # "" for the one unnamed arm, _NAME otherwise
train_arm() {  # NAME ARGS
  local sfx; sfx=$(arm_dir "$1")
  # shellcheck disable=SC2086  # ARGS and STAGE_ARGS are word lists
  step "train$sfx" $(cap $(( TRAIN_S + 50 )) 15) $PY -m qwenvl.train.cli "model=${NANO_INIT:-nano}" stage=$LOSS \
    "output_dir=$WORK/run$sfx" "train_files=[$WORK/data/$TRAIN_FILE]" pack_length=$PACK grad_accum=$ACCUM lr=$LR \
    warmup_steps=$WARMUP min_lr_ratio=0.05 weight_decay=0.05 adam_beta2=0.95 max_steps=100000000 \
    max_train_seconds=$TRAIN_S min_pixels=3136 max_pixels=200704 chunk_size=4096 data_workers=$ARM_WORKERS \
    device=$DEVICE precision=bf16 save_every=${NANO_SAVE_EVERY:-400} keep_checkpoints=1 resume=false \
    max_bad_fraction=0.05 seed=0 $STAGE_ARGS ${2//\{data\}/$WORK/data}
}
eval_arm() {  # NAME: (c) eval on the held-out suite made in (a)
  local sfx; sfx=$(arm_dir "$1")
  if [ "$EVAL_N" != 0 ] && { [ "$DRY" = 1 ] || [ -f "$WORK/run$sfx/final/config.json" ]; }; then
    # the engine's compiled decoder ops and ViT blocks (default on CUDA) would compile for longer than this tiny model's eval runs
    step "eval$sfx" $(cap "$EVAL_TIMEOUT" 20) env "QWENVL_COMPILE_OPS=${NANO_COMPILE_OPS:-0}" "QWENVL_COMPILE_VIT=${NANO_COMPILE_OPS:-0}" $PY -m qwenvl.evaluate.cli --model "$WORK/run$sfx/final" --suite nano \
      --n "$EVAL_N" --suite-root "$WORK/suites" --out "$WORK/eval$sfx" --device "$DEVICE" $EVAL_ARGS $ARM_KV \
      ${UNSEEN_TASKS:+--add-tasks $UNSEEN_TASKS}
  fi
}
for_arms() {  # FUNCTION: runs it for every arm, at once when there are several
  local i pids=()
  for i in "${!ARM_NAMES[@]}"; do
    if [ "$N_ARMS" -gt 1 ] && [ "$DRY" != 1 ]; then "$1" "${ARM_NAMES[$i]}" "${ARM_ARGS[$i]}" & pids+=($!)
    else "$1" "${ARM_NAMES[$i]}" "${ARM_ARGS[$i]}"; fi
  done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
}
for_arms train_arm
# QWENVL_PROFILE_STEP=N (the trainer's torch.profiler over step N): each arm's tables go into steps.log
for i in "${!ARM_NAMES[@]}"; do
  for f in "$WORK/run$(arm_dir "${ARM_NAMES[$i]}")"/profile_step*.txt; do
    [ -f "$f" ] && { echo "== profile ${ARM_NAMES[$i]:-run}: $(basename "$f")"; head -c 20000 "$f"; echo; } >> "$LOG"
  done
done
for_arms eval_arm

# (d) package (from the newest checkpoint if the export is missing) + table; with arms, the eval side by side, then
# each arm's files other than the weight shards are tarred ($OUT/NAME/NAME.tar): the call's 8 files that come back
for i in "${!ARM_NAMES[@]}"; do
  name=${ARM_NAMES[$i]}; sfx=$(arm_dir "$name")
  init=${NANO_INIT:-}; for w in ${ARM_ARGS[$i]}; do [[ $w == model=* ]] && init=${w#model=}; done  # an arm's own init
  times=$( [ "$DRY" = 1 ] || grep -E "^(data|pairs|filter|tag|score|train$sfx|eval$sfx)=" "$WORK/times.txt" | sed "s/$sfx=/=/" | paste -sd, )
  step "package$sfx" $(( $(left) > 15 ? $(cap 60 0) : 15 )) $PY bench/nano_recipe.py package --run "$WORK/run$sfx" \
    --eval "$WORK/eval$sfx" --data "$WORK/data" --out "$OUT${name:+/$name}" --timings "$times" --stage "$STAGE" \
    --init "$init" ${name:+--arm "$name: ${ARM_ARGS[$i]}"}
  [ "$DRY" = 1 ] || cat "$WORK/package$sfx.log"
done
[ "$DRY" = 1 ] && exit 0
if [ -n "${ARM_NAMES[0]}" ]; then
  $PY bench/nano_recipe.py compare $(for n in "${ARM_NAMES[@]}"; do echo "$OUT/$n/summary.json"; done)
  for name in "${ARM_NAMES[@]}"; do
    cp "$WORK/train_$name.log" "$OUT/$name/train.log" 2>/dev/null
    (cd "$OUT/$name" && find . -type f ! -name '*.safetensors' ! -name "$name.tar" | sort | tar cf "$name.tar" -T - \
      && find . -type f ! -name '*.safetensors' ! -name "$name.tar" -delete && find . -type d -empty -delete)
  done
fi
echo "total $(( $(date +%s) - T0 )) s; files in $OUT:"; find "$OUT" -type f | sort | xargs ls -la
