#!/usr/bin/env bash
# Demo model v2 (issue 19) on a GPU machine in one command that fits a time limit: first pretrain the
# image tower for TOWER_MINUTES on dense class targets (lab/probes/tower_probe.py: each token names the
# class that covers it; a fresh image for every example, drawn at 224 px by the workers and flipped /
# turned at random: on the 2-core CPU fresh images beat a reused set of 9,000 in the same 25 min, 0.66
# against 0.51; a random tower of BASE's widths, put into BASE's weights; TOWER_MINUTES=0 skips it),
# then teach the decoder alone to read that tower for DECODER_MINUTES (freeze_vision, caption rows only:
# on the CPU 800 such steps took the class word from the caption-order prior's 0.40 to 0.79, where the
# whole-model mix left it near the prior; DECODER_MINUTES=0 skips it), then train on the whole task mix of
# fresh shapes v2 images made by worker processes (train_source + data_workers: no stored training
# images; the tower stays fixed there too: on the CPU a whole-model mix of stored images took the class
# word from 0.78 to 0.59 in 1,600 steps, the mix of fresh images with the tower fixed took it from 0.59
# to 0.76 in 4,629 and beat it on every task (lab/demo-v2-log.md "The mix with the tower fixed");
# FREEZE_VISION=false trains it), stop cleanly at max_minutes (eval, checkpoint, final export), then
# score the first LIMIT test rows per task and the 20 hand-made images.
# Everything lands under OUT (the device tool's $OUT comes back); one JSON line at the end.
# Without BASE it starts from the v2 build in BUILD (its initial checkpoint, codec and test split),
# making that build first when it is not there (`lab.demo.build --version 2`, warm-started from the
# bundled v1 model, BUILD_ARGS; ~2 min on the 2-core CPU), so a bare checkout needs nothing carried.
#
#   OUT=$OUT lab/probes/demo2_gpu.sh                                      # on the device machine
#   OUT=/tmp/r STEPS=2 BATCH=4 WORKERS=1 LIMIT=4 TOWER_MINUTES=0 lab/probes/demo2_gpu.sh # a CPU rehearsal
#
# The run is bound by how fast the workers make images, so STEPS (DECODER_STEPS) defaults to what
# MINUTES (DECODER_MINUTES) holds at PER_WORKER examples/s per worker, and the cosine schedule reaches 0;
# max_minutes is the safety net (a run it stops has not annealed: the log says at which step; lower
# PER_WORKER then).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the checkout root: lab/ and src/ below it
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device machine has no palikit install: this checkout's
OUT=${OUT:?set OUT to the results folder}
BUILD=${BUILD:-work/demo2}
BUILD_ARGS=${BUILD_ARGS:---train 300}  # the stream makes the training images: the build's own are not used
BASE=${BASE:-}
CODEC=${CODEC:-$BUILD/vae-oid.npz}
DATA=${DATA:-$BUILD/data}
PY=${PY:-python}
MINUTES=${MINUTES:-5}
TOWER_MINUTES=${TOWER_MINUTES:-1.5}
TOWER_BATCH=${TOWER_BATCH:-32}
BATCH=${BATCH:-128}
LR=${LR:-7e-4}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
# the tower's torch threads, the cores the workers leave (2-core CPU, 1 worker, a random tower: 2 threads
# 0.43 s/step, class 0.37 in 22 min; 1 thread 0.27 s/step, 0.66 in 25 min)
TOWER_THREADS=${TOWER_THREADS:-$(( $(nproc) > WORKERS + 1 ? $(nproc) - WORKERS : 1 ))}
PER_WORKER=${PER_WORKER:-60}  # examples/s one worker makes (python -m lab.demo.stream measured ~70 on a 2-core CPU)
steps_in() { $PY -c "print(max(1, int($1 * 60 * $WORKERS * $PER_WORKER / $BATCH)))"; }  # steps MINUTES $1 holds
STEPS=${STEPS:-$(steps_in "$MINUTES")}
DECODER_MINUTES=${DECODER_MINUTES:-1}
DECODER_LR=${DECODER_LR:-1e-3}
DECODER_STEPS=${DECODER_STEPS:-$(steps_in "$DECODER_MINUTES")}
FREEZE_VISION=${FREEZE_VISION:-true}
LIMIT=${LIMIT:-200}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true

tb=$(date +%s)
if [ -z "$BASE" ]; then
  BASE=$BUILD/init
  if [ ! -f "$BASE/model.safetensors" ]; then
    # shellcheck disable=SC2086  # BUILD_ARGS is a list of flags
    $PY -m lab.demo.build --version 2 --out "$BUILD" --warm-start src/palikit/assets/demo-model --no-progress \
      $BUILD_ARGS > "$OUT/build.json" 2> "$OUT/build.log"
  fi
fi
t0=$(date +%s)
START=$BASE
echo '{}' > "$OUT/tower.json"
if [ "$TOWER_MINUTES" != 0 ]; then
  $PY -m lab.probes.tower_probe --init scratch --fresh --make-size 224 --augment --workers "$WORKERS" \
    --batch "$TOWER_BATCH" --threads "$TOWER_THREADS" --score-every 1000 \
    --seconds "$($PY -c "print($TOWER_MINUTES * 60)")" --into "$BASE" --out "$OUT/tower-init" > "$OUT/tower.json" 2> "$OUT/tower.log"
  START=$OUT/tower-init
fi
train_stream() {  # train_stream START OUTDIR STEPS LR MINUTES LOG [overrides...]: fresh images from the workers
  local start=$1 dir=$2 steps=$3 lr=$4 minutes=$5 log=$6
  shift 6
  $PY -m palikit train lab/recipes/demo-v2.yaml model="$start" train_data= train_source=lab.demo.stream:shapes2_source \
    mask_codec="$CODEC" val_data= data_workers="$WORKERS" batch_size="$BATCH" max_steps="$steps" lr="$lr" warmup=50 \
    max_minutes="$minutes" output_dir="$dir" eval_every=0 save_every=0 keep_last=1 progress=false plot=true "$@" > "$log" 2>&1
}
tt=$(date +%s)
if [ "$DECODER_MINUTES" != 0 ]; then
  train_stream "$START" "$OUT/decoder" "$DECODER_STEPS" "$DECODER_LR" "$DECODER_MINUTES" "$OUT/decoder.log" \
    freeze_vision=true "tasks=[caption]"
  START=$OUT/decoder/final
fi
td=$(date +%s)
train_stream "$START" "$OUT/run" "$STEPS" "$LR" "$MINUTES" "$OUT/train.log" freeze_vision="$FREEZE_VISION"
t1=$(date +%s)
rm -rf "$OUT/run/checkpoints" "$OUT/tower-init" "$OUT/decoder"  # resumable state, the starts: not worth bringing back
$PY -m lab.demo.evaluate --version 2 --model "$OUT/run/final" --data "$DATA" --out "$OUT/eval" --limit "$LIMIT" \
  > "$OUT/eval.log" 2>&1
t2=$(date +%s)
last_step() { grep -o 'step [0-9]*/' "$1" | tail -1 | tr -dc 0-9; }
steps=$(last_step "$OUT/train.log")
decoder_steps=0
[ -f "$OUT/decoder.log" ] && decoder_steps=$(last_step "$OUT/decoder.log")
tower=$($PY -c "import json; d = json.load(open('$OUT/tower.json')); print(json.dumps({k: d.get(k) for k in ('steps', 'images_seen', 'class_accuracy', 'fg_bg_accuracy')}))")
echo "{\"start\": \"$START\", \"build_s\": $((t0 - tb)), \"tower_s\": $((tt - t0)), \"tower\": $tower, \"decoder_s\": $((td - tt)), \"decoder_steps\": ${decoder_steps:-0}, \"train_s\": $((t1 - td)), \"freeze_vision\": $FREEZE_VISION, \"eval_s\": $((t2 - t1)), \"steps\": ${steps:-0}, \"batch\": $BATCH, \"workers\": $WORKERS, \"scorecard\": $(tail -1 "$OUT/eval.log")}" | tee "$OUT/result.json"
