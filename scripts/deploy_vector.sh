#!/usr/bin/env bash
# Serve the best vector checkpoint over HTTP in the background. Set the variables (or edit their defaults),
# add any other train_vector.py --mode deploy flag after the script's name (they override the defaults):
#   CORPUS=examples/corpus.jsonl bash scripts/deploy_vector.sh --max-batch-size 128
# A server that fails in its first seconds (port taken, no model) prints its error and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_start.sh

SAVE_PATH=${SAVE_PATH:-./output/vector_model}    # the training run's output directory (its best checkpoint)
HOST=${HOST:-127.0.0.1}          # 0.0.0.0 makes it reachable from other machines: set TOOLKIT_API_KEY then
PORT=${PORT:-8000}
CORPUS=${CORPUS:-}               # JSONL of {"id", "text"} for POST /search (optional)
DEVICE=${DEVICE:-auto}
LOG_FILE=${LOG_FILE:-deploy_vector.log}
# export TOOLKIT_API_KEY=...     # clients then send "Authorization: Bearer <key>"

start_in_background "server on http://$HOST:$PORT (docs at /docs)" "$LOG_FILE" "$PYTHON" train_vector.py \
  --mode deploy \
  --save_path "$SAVE_PATH" \
  --host "$HOST" \
  --port "$PORT" \
  --device "$DEVICE" \
  --max_texts 64 \
  --max_chars 10000 \
  --max_batch_size 64 \
  --batch_wait_ms 5 \
  --eval_batch_size 64 \
  ${CORPUS:+--corpus "$CORPUS"} \
  "$@"
# Stop it with: kill -TERM <pid>   (in-flight requests are answered before it exits)
