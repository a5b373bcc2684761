#!/usr/bin/env bash
# Train a long-document classifier in the background. Set the variables (or edit their defaults), add any
# other train_longdoc.py flag after the script's name; flags given there override the defaults below:
#   DATA_PATH=data/articles.jsonl bash scripts/train_longdoc.sh --aggregation max --epochs 5
# The device is picked by what exists (DEVICE=auto: CUDA when torch sees a GPU, else CPU); NPROC=4 trains
# on 4 GPUs with torchrun. A run that fails in its first seconds prints its error and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_NAME=${MODEL_NAME:-bert-base-chinese}          # hub name or local directory
DATA_PATH=${DATA_PATH:-examples/longdoc_train.jsonl}
VAL_PATH=${VAL_PATH:-}                               # empty: --val-ratio of the training data
TEST_PATH=${TEST_PATH:-}
OUTPUT_DIR=${OUTPUT_DIR:-./output/longdoc}
LABELS=${LABELS:-}                                   # e.g. negative,positive; empty: names from the data
TEXT_FIELD=${TEXT_FIELD:-}                           # column holding the text when it is not "text"
LABEL_FIELD=${LABEL_FIELD:-}                         # column holding the label when it is not "label"
DEVICE=${DEVICE:-auto}
LOG_FILE=${LOG_FILE:-train_longdoc.log}

python_command train_longdoc.py
start_in_background training "$LOG_FILE" "${COMMAND[@]}" \
  --config configs/longdoc.yaml \
  --model-name "$MODEL_NAME" \
  --data-path "$DATA_PATH" \
  ${VAL_PATH:+--val-path "$VAL_PATH"} \
  ${TEST_PATH:+--test-path "$TEST_PATH"} \
  --output-dir "$OUTPUT_DIR" \
  ${LABELS:+--labels "$LABELS"} \
  ${TEXT_FIELD:+--text-field "$TEXT_FIELD"} \
  ${LABEL_FIELD:+--label-field "$LABEL_FIELD"} \
  --device "$DEVICE" \
  --max-length 512 \
  --stride 128 \
  --aggregation mean \
  --batch-size 4 \
  --chunk-batch-size 16 \
  --epochs 3 \
  --learning-rate 2e-5 \
  --precision auto \
  --seed 42 \
  "$@"
# --batch-size is documents per process: with NPROC=4 each step sees 4 x 4 documents.
