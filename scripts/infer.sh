#!/usr/bin/env bash
# Run a trained model (directory or .onnx export) on one text or a file, or serve it
# (edit the variables, then: bash scripts/infer.sh). Preprocessing comes from the model itself.
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL_PATH=${MODEL_PATH:-./output/classifier/checkpoint-best}   # or ./models/model.onnx
DEVICE=${DEVICE:-auto}                                          # auto: cuda when torch sees a GPU, else cpu
INPUT_FILE=${INPUT_FILE:-}                                      # .txt / .json / .jsonl / .csv; empty: one --text
OUTPUT_FILE=${OUTPUT_FILE:-predictions.jsonl}
LOG_FILE=${LOG_FILE:-infer.log}

if [ -z "$INPUT_FILE" ]; then
  python infer.py \
    --model-path "$MODEL_PATH" \
    --backend auto \
    --device "$DEVICE" \
    --text "今天天气真好啊"
  # add --temperature 1.0 to override the calibrated temperature stored with the model
  exit $?
fi

nohup python infer.py \
  --model-path "$MODEL_PATH" \
  --backend auto \
  --device "$DEVICE" \
  --file "$INPUT_FILE" \
  --output "$OUTPUT_FILE" \
  --batch-size 64 \
  --sort-by-length true \
  > "$LOG_FILE" 2>&1 &
echo "inference started (pid $!), log: $LOG_FILE, results: $OUTPUT_FILE"
# Serve over HTTP (POST /predict, or /encode for vector models):
# python infer.py --model-path "$MODEL_PATH" --serve --host 0.0.0.0 --port 8000 --api-key "$API_KEY"
