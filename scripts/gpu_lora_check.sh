#!/usr/bin/env bash
# Issue 34's GPU figures in one command that fits the device tool's limit: `palikit bench-serve --adapters 8`
# (multi-LoRA vs the base model alone vs swapping merged adapters per batch, same trace, one run each) on
# the bundled demo model and on PaliGemma 2 3B-224 at full size (random weights; answers run to their
# budgets, set near PaliGemma's real answer lengths: a word, a caption, three masks). Each run ends with
# one JSON line; both land under OUT (the device tool's $OUT comes back). The CPU figures are in the
# README ("Many adapters in one batch"); this is the half that needs a GPU.
#
#   bash scripts/gpu_lora_check.sh            # on the device machine, from the checkout's root
#   DEVICE=cpu MODEL=tiny-pg2 REQUESTS=8 bash scripts/gpu_lora_check.sh   # a dry run of the script here
set -euo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the device machine has no palikit install
OUT=${OUT:-/tmp/palikit-gpu-lora}
PY=${PY:-python}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi") | tee "$OUT/gpu.txt"
timeout "${DEMO_TIMEOUT:-150}" "$PY" -m palikit bench-serve --adapters 8 --device "$DEVICE" --dtype bfloat16 \
  --requests "${DEMO_REQUESTS:-480}" | tee "$OUT/lora_demo.txt"
timeout "${FULL_TIMEOUT:-360}" "$PY" -m palikit bench-serve --adapters 8 --model "${MODEL:-pg2-3b-224}" \
  --device "$DEVICE" --dtype bfloat16 --requests "${REQUESTS:-240}" --max-new-tokens short=4,caption=16,long=64 \
  | tee "$OUT/lora_3b.txt"
