#!/usr/bin/env bash
# Fine-tune a bi-encoder on a GPU box in the background (edit the variables, then: bash scripts/train_vector.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL_NAME=${MODEL_NAME:-bert-base-uncased}
TRAIN_PATH=${TRAIN_PATH:-data/vec_train.json}
VAL_PATH=${VAL_PATH:-data/vec_valid.json}
SAVE_PATH=${SAVE_PATH:-./output/vector_model}
LOG_FILE=${LOG_FILE:-train_vector.log}

nohup python train_vector.py \
  --mode train \
  --config configs/vector.yaml \
  --model_name "$MODEL_NAME" \
  --train_path "$TRAIN_PATH" \
  --val_path "$VAL_PATH" \
  --save_path "$SAVE_PATH" \
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
  --warmup_steps 100 \
  --max_grad_norm 1.0 \
  --precision auto \
  --save_steps 200 \
  --logging_steps 50 \
  --patience 3 \
  --seed 42 \
  > "$LOG_FILE" 2>&1 &
echo "training started (pid $!), log: $LOG_FILE"
# Then pick the best checkpoint (lowest validation loss) and see its ranking metrics:
#   python train_vector.py --mode evaluate --test_path data/vec_test.json --save_path "$SAVE_PATH" --select_best
# Multi-GPU: torchrun --nproc_per_node 4 train_vector.py --mode train ... (same flags; --batch_size is per GPU)
# Resume after a crash: run the same command with --resume.
