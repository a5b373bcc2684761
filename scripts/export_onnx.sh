#!/usr/bin/env bash
# Export a trained model directory to ONNX and check it against PyTorch
# (edit the variables, then: bash scripts/export_onnx.sh). Exit 1 means the parity gate refused it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
MODEL_PATH=${MODEL_PATH:-./output/classifier/checkpoint-best}
OUTPUT_PATH=${OUTPUT_PATH:-./models/model.onnx}
VALIDATION_FILE=${VALIDATION_FILE:-}          # labelled records; required to gate --quantize int8
QUANTIZE=${QUANTIZE:-none}                    # none | int8
LOG_FILE=${LOG_FILE:-export_onnx.log}

python export_onnx.py \
  --model-path "$MODEL_PATH" \
  --output-path "$OUTPUT_PATH" \
  --optimize true \
  --quantize "$QUANTIZE" \
  --opset 17 \
  --exporter torchscript \
  --device cpu \
  --tolerance 1e-4 \
  --max-metric-drop 0.01 \
  ${VALIDATION_FILE:+--validation-file "$VALIDATION_FILE"} \
  2>&1 | tee "$LOG_FILE"

# Re-check an existing export later (tokenizer/ and model.preprocessing.json sit beside it):
# python export_onnx.py --validate --model-path ./models/model.onnx --tokenizer-path ./models/tokenizer
