#!/usr/bin/env bash
# Export a trained model directory to ONNX and check it against PyTorch. Set the variables (or edit their
# defaults), add any other export_onnx.py flag after the script's name (they override the defaults):
#   MODEL_PATH=output/classifier/checkpoint-best bash scripts/export_onnx.sh --opset 18
# Exit 1 means the parity gate refused the export; 2 a usage error (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

MODEL_PATH=${MODEL_PATH:-./output/classifier/checkpoint-best}
OUTPUT_PATH=${OUTPUT_PATH:-./models/model.onnx}
VALIDATION_FILE=${VALIDATION_FILE:-}          # labelled records; required to gate --quantize int8
QUANTIZE=${QUANTIZE:-none}                    # none | int8 (the fastest recipe that passes the gate)
OPTIMIZE=${OPTIMIZE:-auto}                    # auto (whichever is faster here) | true | false
DEVICE=${DEVICE:-cpu}                         # the parity run; auto: CUDA when onnxruntime-gpu and a GPU exist
LOG_FILE=${LOG_FILE:-export_onnx.log}

run_command "$PYTHON" export_onnx.py \
  --model-path "$MODEL_PATH" \
  --output-path "$OUTPUT_PATH" \
  --optimize "$OPTIMIZE" \
  --quantize "$QUANTIZE" \
  --opset 17 \
  --exporter torchscript \
  --device "$DEVICE" \
  --tolerance 1e-4 \
  --max-metric-drop 0.005 \
  --min-label-agreement 0.99 \
  ${VALIDATION_FILE:+--validation-file "$VALIDATION_FILE"} \
  "$@" \
  2>&1 | tee "$LOG_FILE"

# Re-check an existing export later (tokenizer/ and model.preprocessing.json sit beside it):
# python export_onnx.py --validate --model-path ./models/model.onnx --tokenizer-path ./models/tokenizer
