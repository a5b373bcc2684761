#!/usr/bin/env bash
# Fine-tune a bi-encoder in the background. Set the variables (or edit their defaults), add any other
# train_vector.py flag after the script's name; flags given there override the defaults below:
#   TRAIN_PATH=data/pairs.jsonl VAL_PATH=data/val.jsonl bash scripts/train_vector.sh --loss cosent
# The device is picked by what exists (DEVICE=auto: CUDA when torch sees a GPU, else CPU); NPROC=4 trains
# on 4 GPUs with torchrun; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT or RDZV_ENDPOINT spread it over several
# machines (run it on each; see scripts/_start.sh). A run that fails in its first seconds prints its error
# and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_NAME=${MODEL_NAME:-bert-base-uncased}          # hub name or local directory
TRAIN_PATH=${TRAIN_PATH:-examples/vec_train.jsonl}   # {query, document, rel, weight} pairs
VAL_PATH=${VAL_PATH:-examples/vec_valid.jsonl}
TEST_PATH=${TEST_PATH:-}
SAVE_PATH=${SAVE_PATH:-./output/vector_model}
DEVICE=${DEVICE:-auto}
LOG_FILE=${LOG_FILE:-train_vector.log}

python_command train_vector.py
start_in_background training "$LOG_FILE" "${COMMAND[@]}" \
  --mode train \
  --config configs/vector.yaml \
  --model_name "$MODEL_NAME" \
  --train_path "$TRAIN_PATH" \
  --val_path "$VAL_PATH" \
  ${TEST_PATH:+--test_path "$TEST_PATH"} \
  --save_path "$SAVE_PATH" \
  --device "$DEVICE" \
  --max_length 512 \
  --query_max_length 64 \
  --doc_max_length 512 \
  --pooling cls \
  --projection_dim 0 \
  --loss mse \
  --batch_size 16 \
  --gradient_accumulation_steps 1 \
  --learning_rate 2e-5 \
  --num_epochs 3 \
  --max_grad_norm 1.0 \
  --precision auto \
  --save_steps 200 \
  --logging_steps 50 \
  --patience 3 \
  --seed 42 \
  "$@"
# Then pick the best checkpoint (lowest validation loss) and see its ranking metrics:
#   python train_vector.py --mode evaluate --test_path examples/vec_test.jsonl --save_path "$SAVE_PATH" --select_best
# Resume after a crash: run the same command with --resume.
