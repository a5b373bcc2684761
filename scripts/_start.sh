#!/usr/bin/env bash
# Helpers that the other wrappers source (not a script to run on its own):
#   run_command CMD...                        run in the foreground; the wrapper exits with its status
#   start_in_background WHAT LOG_FILE CMD...  nohup CMD > LOG_FILE; says "WHAT started" only when the job
#                                             survives its first START_WAIT seconds, else prints the log's
#                                             error line and exits with the job's status
#   start_training SCRIPT FLAGS...            start_in_background SCRIPT.py with configs/<task>.yaml, the data,
#                                             label and device flags of the variables below, then FLAGS
#   python_command SCRIPT                     python SCRIPT, or torchrun with NPROC processes when NPROC > 1
# Settings every wrapper shares (environment variables):
#   PYTHON      interpreter (default: python)
#   NPROC       processes for a training run per machine, one per GPU (default 1; > 1 starts torchrun)
# More than one machine (run the same wrapper on each, with the same settings but NODE_RANK):
#   NNODES      machines taking part (default 1; > 1 starts torchrun even with NPROC=1)
#   NODE_RANK   this machine's rank, 0 to NNODES-1 (rank 0 hosts the rendezvous and writes the outputs)
#   MASTER_ADDR, MASTER_PORT   address and free port of the NODE_RANK=0 machine (port default 29500)
#   RDZV_ENDPOINT  host:port of a c10d rendezvous instead (elastic: no NODE_RANK needed); RDZV_ID names
#               the job (default: toolkit)
#   START_WAIT  seconds to watch a background job for a failed start (default 20; 0: do not wait)
#   DRY_RUN=1   print the command instead of running it
# Settings of the classification trainers (train_classifier.sh, train_longdoc.sh), read by start_training:
#   MODEL_NAME, DATA_PATH, OUTPUT_DIR, LABELS   each wrapper sets its own defaults
#   VAL_PATH    validation file (default: none, --val-ratio of the training data)
#   TEST_PATH   test file (default: none)
#   TEXT_FIELD  column holding the text when it is not "text"
#   LABEL_FIELD column holding the label when it is not "label"
#   DEVICE      auto (default: CUDA when torch sees a GPU, else CPU), cpu, cuda, cuda:1, ...
#   LOG_FILE    where the run's output goes (default: SCRIPT.log)

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
NNODES=${NNODES:-1}
START_WAIT=${START_WAIT:-20}

# A mistyped count is one line naming it, not a bash arithmetic error later or (NPROC=two)
# silently one process.
require_count() {  # NAME VALUE SMALLEST
  case $2 in
    '' | *[!0-9]*) ;;
    *) [ "$2" -ge "$3" ] && return 0 ;;
  esac
  echo "error: $1 must be a whole number, at least $3 (got '$2')" >&2
  exit 2
}
require_count NPROC "$NPROC" 1
require_count NNODES "$NNODES" 1
require_count START_WAIT "$START_WAIT" 0

# torchrun's rendezvous flags: one machine (--standalone), several with a c10d endpoint, or several
# with a fixed master (NODE_RANK, MASTER_ADDR, MASTER_PORT, as torchrun's static rendezvous).
rendezvous_flags() {
  if [ "$NNODES" -eq 1 ]; then
    RENDEZVOUS=(--standalone)
  elif [ -n "${RDZV_ENDPOINT:-}" ]; then
    RENDEZVOUS=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-toolkit}")
  else
    if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
      echo "error: NNODES=$NNODES needs NODE_RANK and MASTER_ADDR (the NODE_RANK=0 machine), or RDZV_ENDPOINT" >&2
      exit 2
    fi
    require_count NODE_RANK "$NODE_RANK" 0
    if [ "$NODE_RANK" -ge "$NNODES" ]; then
      echo "error: NODE_RANK must be below NNODES=$NNODES (got '$NODE_RANK')" >&2
      exit 2
    fi
    require_count MASTER_PORT "${MASTER_PORT:-29500}" 1
    RENDEZVOUS=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
                --master_port "${MASTER_PORT:-29500}")
  fi
}

python_command() {
  if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    rendezvous_flags
    COMMAND=("$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc_per_node "$NPROC" "$1")
  else
    COMMAND=("$PYTHON" "$1")
  fi
}

print_command() {
  printf '%q ' "$@"
  printf '\n'
}

run_command() {
  if [ -n "${DRY_RUN:-}" ]; then print_command "$@"; return 0; fi
  "$@"
}

# The first "error:" line of a log (this toolkit's one-line errors), else its last non-empty line
# (the exception line that ends a traceback).
log_error_line() {
  grep -m 1 '^error:' "$1" || grep -v '^[[:space:]]*$' "$1" | tail -n 1 | grep . || echo "(the log is empty)"
}

start_in_background() {
  local what=$1 log_file=$2
  shift 2
  if [ -n "${DRY_RUN:-}" ]; then print_command "$@"; return 0; fi
  if ! { : > "$log_file"; } 2> /dev/null; then
    echo "$what failed to start: cannot write the log file $log_file" >&2
    exit 1
  fi
  nohup "$@" > "$log_file" 2>&1 &
  local pid=$! checks=0 status=0
  # a mistyped flag, a missing file or a model that cannot load fail within seconds: watch for that
  # before saying the job started
  while kill -0 "$pid" 2> /dev/null && [ "$checks" -lt $((START_WAIT * 2)) ]; do
    sleep 0.5
    checks=$((checks + 1))
  done
  if kill -0 "$pid" 2> /dev/null; then
    echo "$what started (pid $pid), log: $log_file"
    return 0
  fi
  wait "$pid" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "$what failed to start (exit $status): $(log_error_line "$log_file")" >&2
    echo "full log: $log_file" >&2
    exit "$status"
  fi
  echo "$what finished (exit 0), log: $log_file"
}

start_training() {
  local script=$1
  shift
  python_command "$script.py"
  # the flags before "$@" are defaults: a flag given after the wrapper's name comes later and wins
  start_in_background training "${LOG_FILE:-$script.log}" "${COMMAND[@]}" \
    --config "configs/${script#train_}.yaml" \
    --model-name "$MODEL_NAME" \
    --data-path "$DATA_PATH" \
    ${VAL_PATH:+--val-path "$VAL_PATH"} \
    ${TEST_PATH:+--test-path "$TEST_PATH"} \
    --output-dir "$OUTPUT_DIR" \
    ${LABELS:+--labels "$LABELS"} \
    ${TEXT_FIELD:+--text-field "$TEXT_FIELD"} \
    ${LABEL_FIELD:+--label-field "$LABEL_FIELD"} \
    --device "${DEVICE:-auto}" \
    "$@"
}
