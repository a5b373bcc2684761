#!/usr/bin/env bash
# Helpers that the other wrappers source (not a script to run on its own):
#   run_command CMD...                        run in the foreground; the wrapper exits with its status
#   start_in_background WHAT LOG_FILE CMD...  nohup CMD > LOG_FILE; says "WHAT started" only when the job
#                                             survives its first START_WAIT seconds, else prints the log's
#                                             error line and exits with the job's status
#   python_command SCRIPT                     python SCRIPT, or torchrun with NPROC processes when NPROC > 1
# Settings every wrapper shares (environment variables):
#   PYTHON      interpreter (default: python)
#   NPROC       processes for a training run, one per GPU (default 1; > 1 starts torchrun)
#   START_WAIT  seconds to watch a background job for a failed start (default 20; 0: do not wait)
#   DRY_RUN=1   print the command instead of running it

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
START_WAIT=${START_WAIT:-20}

python_command() {
  if [ "$NPROC" -gt 1 ]; then
    COMMAND=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$1")
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
  grep -m 1 '^error:' "$1" || grep -v '^[[:space:]]*$' "$1" | tail -n 1
}

start_in_background() {
  local what=$1 log_file=$2
  shift 2
  if [ -n "${DRY_RUN:-}" ]; then print_command "$@"; return 0; fi
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
