#!/usr/bin/env bash
# Fine-tune a classifier on a GPU box in the background (edit the variables, then: bash scripts/train_classifier.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL_NAME=${MODEL_NAME:-hfl/chinese-bert-wwm-ext}
DATA_PATH=${DATA_PATH:-examples/messages.json}
OUTPUT_DIR=${OUTPUT_DIR:-./output/classifier}
LOG_FILE=${LOG_FILE:-train_classifier.log}

nohup python train_classifier.py \
  --config configs/classifier.yaml \
  --model-name "$MODEL_NAME" \
  --data-path "$DATA_PATH" \
  --output-dir "$OUTPUT_DIR" \
  --labels low_value,normal,interrupt \
  --epochs 10 \
  --batch-size 32 \
  --gradient-accumulation-steps 1 \
  --learning-rate 2e-5 \
  --warmup-ratio 0.1 \
  --max-length 128 \
  --precision auto \
  --max-grad-norm 1.0 \
  --eval-steps 500 \
  --save-steps 500 \
  --save-total-limit 3 \
  --logging-steps 100 \
  --patience 3 \
  --metric-for-best-model macro_f1 \
  --seed 42 \
  > "$LOG_FILE" 2>&1 &
echo "training started (pid $!), log: $LOG_FILE"
# Multi-GPU: torchrun --nproc_per_node 4 train_classifier.py ... (same flags; --batch-size is per GPU)
