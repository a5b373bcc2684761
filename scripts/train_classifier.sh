#!/usr/bin/env bash
# Fine-tune a classifier in the background. Set the variables (or edit their defaults), add any other
# train_classifier.py flag after the script's name; flags given there override the defaults below:
#   MODEL_NAME=./models/bert DATA_PATH=data/train.jsonl bash scripts/train_classifier.sh --epochs 5 --fp16
# Also read: VAL_PATH, TEST_PATH, TEXT_FIELD, LABEL_FIELD, DEVICE (auto: CUDA when torch sees a GPU, else
# CPU), LOG_FILE, NPROC (4: train on 4 GPUs with torchrun), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# or RDZV_ENDPOINT (several machines: run it on each); see scripts/_start.sh. A run that fails in its
# first seconds prints its error and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_NAME=${MODEL_NAME:-hfl/chinese-bert-wwm-ext}   # hub name or local directory
DATA_PATH=${DATA_PATH:-examples/messages.json}       # JSON, JSONL, CSV/TSV or a save_to_disk directory
OUTPUT_DIR=${OUTPUT_DIR:-./output/classifier}
LABELS=${LABELS-low_value,normal,interrupt}          # label order and ids; LABELS= takes them from the data

# --batch-size is per process: with NPROC=4 each step sees 4 x 32 examples.
start_training train_classifier \
  --epochs 10 \
  --batch-size 32 \
  --gradient-accumulation-steps 1 \
  --learning-rate 2e-5 \
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
  "$@"
