#!/usr/bin/env bash
# Train a long-document classifier in the background. Set the variables (or edit their defaults), add any
# other train_longdoc.py flag after the script's name; flags given there override the defaults below:
#   DATA_PATH=data/articles.jsonl bash scripts/train_longdoc.sh --aggregation max --epochs 5
# Also read: VAL_PATH, TEST_PATH, TEXT_FIELD, LABEL_FIELD, DEVICE (auto: CUDA when torch sees a GPU, else
# CPU), LOG_FILE, NPROC (4: train on 4 GPUs with torchrun), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# or RDZV_ENDPOINT (several machines: run it on each); see scripts/_start.sh. A run that fails in its
# first seconds prints its error and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_NAME=${MODEL_NAME:-bert-base-chinese}          # hub name or local directory
DATA_PATH=${DATA_PATH:-examples/longdoc_train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-./output/longdoc}
LABELS=${LABELS:-}                                   # e.g. negative,positive; empty: names from the data

# --batch-size is documents per process: with NPROC=4 each step sees 4 x 4 documents.
start_training train_longdoc \
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
