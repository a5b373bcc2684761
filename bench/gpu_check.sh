#!/usr/bin/env bash
# Prove every CUDA path on this machine's GPU(s) in one run (a few minutes on one GPU), then print one table:
#   bash bench/gpu_check.sh [--model DIR] [--work-dir DIR]
# fp16 + GradScaler and bf16 training of each trainer (the loss falls, an interrupted run resumes to the same
# weights bit for bit), DDP when there are two GPUs, the onnxruntime CUDA provider through export_onnx.py's
# parity gate, infer.py --device cuda against --device cpu, bench/serve_load.py against a server on the GPU.
# Exit 0: every check passed (or was skipped, with why) - also when no GPU is visible, which is said in one
# line and proves nothing; 1: a check failed (its row says why); 2: a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
MODEL=../shared/models/all-MiniLM-L6-v2
WORK_DIR=bench/results/gpu_check

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case $1 in
    --model | --work-dir)
      if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "error: $1 needs a value" >&2
        exit 2
      fi
      if [ "$1" = --model ]; then MODEL=$2; else WORK_DIR=$2; fi
      shift 2
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ ! -d "$MODEL" ]; then
  echo "error: --model $MODEL: not a directory (an English encoder, e.g. all-MiniLM-L6-v2)" >&2
  exit 2
fi
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$gpus" -eq 0 ]; then
  echo "gpu_check: no CUDA GPU visible to torch on this machine: nothing checked, the CUDA paths stay unproven"
  exit 0
fi
exec "$PYTHON" bench/gpu_check.py --model "$MODEL" --work-dir "$WORK_DIR"
