#!/usr/bin/env bash
# Train a long-document classifier on a GPU box in the background (edit the variables, then: bash scripts/train_longdoc.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL_NAME=${MODEL_NAME:-bert-base-chinese}
DATA_PATH=${DATA_PATH:-examples/longdoc_train.jsonl}
VAL_PATH=${VAL_PATH:-}
OUTPUT_DIR=${OUTPUT_DIR:-./output/longdoc}
LOG_FILE=${LOG_FILE:-train_longdoc.log}

nohup python train_longdoc.py \
  --config configs/longdoc.yaml \
  --model-name "$MODEL_NAME" \
  --data-path "$DATA_PATH" \
  ${VAL_PATH:+--val-path "$VAL_PATH"} \
  --output-dir "$OUTPUT_DIR" \
  --max-length 512 \
  --stride 128 \
  --aggregation mean \
  --batch-size 4 \
  --chunk-batch-size 16 \
  --epochs 3 \
  --learning-rate 2e-5 \
  --precision auto \
  --seed 42 \
  > "$LOG_FILE" 2>&1 &
echo "training started (pid $!), log: $LOG_FILE"
# Multi-GPU: torchrun --nproc_per_node 4 train_longdoc.py ... (same flags; --batch-size is documents per GPU)
