#!/usr/bin/env bash
# Run a trained model (directory or .onnx export) on one text, a file, or interactively. Set the variables
# (or edit their defaults), add any other infer.py flag after the script's name (they override the defaults):
#   MODEL_PATH=models/model.onnx INPUT_FILE=data/test.jsonl bash scripts/infer.sh --batch-size 128
#   TEXT= bash scripts/infer.sh          # no text: on a terminal, type texts and see each answer
# Preprocessing comes from the model itself. A file run goes to the background; one that fails in its
# first seconds prints its error and exits non-zero. NPROC=2 shards a file run over 2 torchrun processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_PATH=${MODEL_PATH:-./output/classifier/checkpoint-best}   # or ./models/model.onnx
DEVICE=${DEVICE:-auto}                                          # auto: cuda when torch sees a GPU, else cpu
TEXT=${TEXT-今天天气真好啊}                                      # used when INPUT_FILE is empty
INPUT_FILE=${INPUT_FILE:-}                                      # .txt / .json / .jsonl / .csv
OUTPUT_FILE=${OUTPUT_FILE:-predictions.jsonl}
LOG_FILE=${LOG_FILE:-infer.log}

if [ -z "$INPUT_FILE" ]; then
  # add --temperature 1.0 to override the calibrated temperature stored with the model
  run_command "$PYTHON" infer.py \
    --model-path "$MODEL_PATH" \
    --backend auto \
    --device "$DEVICE" \
    ${TEXT:+--text "$TEXT"} \
    "$@"
  exit 0
fi

# NPROC > 1 (or NNODES > 1) shards the file across torchrun processes; one output, in input order
python_command infer.py
start_in_background inference "$LOG_FILE" "${COMMAND[@]}" \
  --model-path "$MODEL_PATH" \
  --backend auto \
  --device "$DEVICE" \
  --file "$INPUT_FILE" \
  --output "$OUTPUT_FILE" \
  --batch-size 64 \
  --sort-by-length true \
  "$@"
echo "results: $OUTPUT_FILE"
# Serve over HTTP (POST /predict, or /encode for vector models):
# python infer.py --model-path "$MODEL_PATH" --serve --host 0.0.0.0 --port 8000 --api-key "$API_KEY"
