#!/usr/bin/env bash
# Demo model v2 (issue 19) on a GPU machine in one command that fits a time limit: first pretrain the
# image tower for TOWER_MINUTES on dense class targets (scripts/tower_probe.py: each token names the
# class that covers it; a fresh image for every example, drawn at 224 px by the workers and flipped /
# turned at random: on the 2-core CPU fresh images beat a reused set of 9,000 in the same 25 min, 0.66
# against 0.51; a random tower of BASE's widths, put into BASE's weights; TOWER_MINUTES=0 skips it),
# then train the whole model on fresh shapes v2 images made by worker processes (train_source +
# data_workers: no stored training images, nothing to carry but the weights, the codec and the test
# split), stop cleanly at max_minutes (eval, checkpoint, final export), then score the first LIMIT test
# rows per task and the 20 hand-made images.
# Everything lands under OUT (the device tool's $OUT comes back); one JSON line at the end.
#
#   OUT=$OUT BASE=work/v2cont/run/final scripts/demo2_gpu.sh          # on the device machine
#   OUT=/tmp/r STEPS=2 BATCH=4 WORKERS=1 LIMIT=4 TOWER_MINUTES=0 scripts/demo2_gpu.sh # a CPU rehearsal
#
# The run is bound by how fast the workers make images, so STEPS defaults to what MINUTES holds at
# PER_WORKER examples/s per worker, and the cosine schedule reaches 0; max_minutes is the safety net (a
# run it stops has not annealed: the log says at which step; lower PER_WORKER then).
# Carry (ignored paths, 57 MB with the defaults): work/v2cont/run/final, work/demo2/vae-oid.npz,
# work/demo2/data/test, work/demo2/data/test.jsonl, work/demo2/data/test_coco.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device machine has no palikit install: this checkout's
OUT=${OUT:?set OUT to the results folder}
BASE=${BASE:-work/v2cont/run/final}
CODEC=${CODEC:-work/demo2/vae-oid.npz}
DATA=${DATA:-work/demo2/data}
PY=${PY:-python}
MINUTES=${MINUTES:-5}
TOWER_MINUTES=${TOWER_MINUTES:-1.5}
TOWER_BATCH=${TOWER_BATCH:-32}
BATCH=${BATCH:-128}
LR=${LR:-7e-4}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
PER_WORKER=${PER_WORKER:-60}  # examples/s one worker makes (python -m palikit.demo.stream measured ~70 on a 2-core CPU)
STEPS=${STEPS:-$($PY -c "print(max(1, int($MINUTES * 60 * $WORKERS * $PER_WORKER / $BATCH)))")}
LIMIT=${LIMIT:-200}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true

t0=$(date +%s)
START=$BASE
echo '{}' > "$OUT/tower.json"
if [ "$TOWER_MINUTES" != 0 ]; then
  $PY scripts/tower_probe.py --init scratch --fresh --make-size 224 --augment --workers "$WORKERS" \
    --batch "$TOWER_BATCH" --threads "$(nproc)" --score-every 1000 \
    --seconds "$($PY -c "print($TOWER_MINUTES * 60)")" --into "$BASE" --out "$OUT/tower-init" > "$OUT/tower.json" 2> "$OUT/tower.log"
  START=$OUT/tower-init
fi
tt=$(date +%s)
$PY -m palikit train recipes/demo-v2.yaml model="$START" train_data= train_source=palikit.demo.stream:shapes2_source \
  mask_codec="$CODEC" val_data= data_workers="$WORKERS" batch_size="$BATCH" max_steps="$STEPS" lr="$LR" warmup=50 \
  max_minutes="$MINUTES" output_dir="$OUT/run" eval_every=0 save_every=0 keep_last=1 progress=false plot=true \
  > "$OUT/train.log" 2>&1
t1=$(date +%s)
rm -rf "$OUT/run/checkpoints" "$OUT/tower-init"  # resumable state, the start: not worth bringing back
$PY -m palikit.demo.evaluate --version 2 --model "$OUT/run/final" --data "$DATA" --out "$OUT/eval" --limit "$LIMIT" \
  > "$OUT/eval.log" 2>&1
t2=$(date +%s)
steps=$(grep -o 'step [0-9]*/' "$OUT/train.log" | tail -1 | tr -dc 0-9)
tower=$($PY -c "import json; d = json.load(open('$OUT/tower.json')); print(json.dumps({k: d.get(k) for k in ('steps', 'images_seen', 'class_accuracy', 'fg_bg_accuracy')}))")
echo "{\"start\": \"$START\", \"tower_s\": $((tt - t0)), \"tower\": $tower, \"train_s\": $((t1 - tt)), \"eval_s\": $((t2 - t1)), \"steps\": ${steps:-0}, \"batch\": $BATCH, \"workers\": $WORKERS, \"scorecard\": $(tail -1 "$OUT/eval.log")}" | tee "$OUT/result.json"
