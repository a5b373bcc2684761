#!/usr/bin/env bash
# Serve the best vector checkpoint over HTTP in the background (edit the variables, then: bash scripts/deploy_vector.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
SAVE_PATH=${SAVE_PATH:-./output/vector_model}
HOST=${HOST:-127.0.0.1}          # 0.0.0.0 makes it reachable from other machines: set TOOLKIT_API_KEY then
PORT=${PORT:-8000}
CORPUS=${CORPUS:-}               # JSONL of {"id", "text"} for POST /search (optional)
LOG_FILE=${LOG_FILE:-deploy_vector.log}
# export TOOLKIT_API_KEY=...     # clients then send "Authorization: Bearer <key>"

CORPUS_FLAG=()
if [ -n "$CORPUS" ]; then CORPUS_FLAG=(--corpus "$CORPUS"); fi

nohup python train_vector.py \
  --mode deploy \
  --save_path "$SAVE_PATH" \
  --host "$HOST" \
  --port "$PORT" \
  --device auto \
  --max_texts 64 \
  --max_chars 10000 \
  --max_batch_size 64 \
  --batch_wait_ms 5 \
  --eval_batch_size 64 \
  "${CORPUS_FLAG[@]}" \
  > "$LOG_FILE" 2>&1 &
echo "server started (pid $!) on http://$HOST:$PORT (docs at /docs), log: $LOG_FILE"
# Stop it with: kill -TERM <pid>   (in-flight requests are answered before it exits)
