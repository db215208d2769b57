#!/usr/bin/env bash
# Runs an `instructor-jax` command (train, encode) as N processes on this machine, joined through a
# coordinator on localhost: a multi-host stand-in on CPU (each process gets DEVICES_PER_PROCESS fake CPU
# devices via XLA_FLAGS). Waits for all of them; if one fails, stops the others and exits with its status.
#
#   launch/local_multiprocess.sh N GIN_FILE WORKDIR [GIN_BINDING ...]     # train (the original form)
#   launch/local_multiprocess.sh N SUBCOMMAND [ARG ...]                   # any subcommand, arguments as given
#   launch/local_multiprocess.sh 2 configs/tiny.gin runs/tiny-2proc 'TrainConfig.total_steps = 50'
#   launch/local_multiprocess.sh 2 encode --model runs/tiny/model --input corpus.jsonl --output emb/emb.npy
#   launch/local_multiprocess.sh --dry-run 2 configs/tiny.gin runs/tiny-2proc   # or DRY_RUN=1: print, run nothing
#
# Each process gets --coordinator_address 127.0.0.1:PORT --num_processes N --process_id I after the arguments.
# Environment: DEVICES_PER_PROCESS (default 2), PORT (default: a free one), PLATFORM (default cpu; empty
# leaves JAX_PLATFORMS alone), INSTRUCTOR_JAX (the command; default `instructor-jax` if on PATH, else
# `python -m instructor_jax.cli`), LOG_DIR (processes 1..N-1 write there; process 0 writes to this terminal;
# default WORKDIR/process_logs for train, the --output's directory/process_logs for encode).
set -euo pipefail

source "$(dirname "$0")/common.sh"
parse_dry_run "$@"; set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || usage
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$N'" >&2; exit 2; }
command_args "$@"

DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
PLATFORM="${PLATFORM-cpu}"
LOG_DIR="${LOG_DIR:-$(default_log_dir "${CMD[@]}")}"
if [[ -z "${PORT:-}" ]]; then
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -n "${INSTRUCTOR_JAX:-}" ]]; then
  read -r -a TRAIN <<< "$INSTRUCTOR_JAX"
elif command -v instructor-jax > /dev/null; then
  TRAIN=(instructor-jax)
else
  TRAIN=(python3 -m instructor_jax.cli)
fi

args=("${CMD[@]}" --coordinator_address "127.0.0.1:$PORT" --num_processes "$N")

env_of() {  # the environment of one process
  # The caller's XLA_FLAGS are kept; the device count comes last, so it is the one XLA uses.
  local e=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  [[ -n "$PLATFORM" ]] && e+=("JAX_PLATFORMS=$PLATFORM")
  printf '%s\n' "${e[@]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    mapfile -t e < <(env_of)
    redirect=""; [[ $i -gt 0 ]] && redirect=" > $(q "$LOG_DIR/process_$i.log") 2>&1"
    echo "env $(qall "${e[@]}" "${TRAIN[@]}" "${args[@]}" --process_id "$i")${redirect} &"
  done
  echo "wait  # for all $N; the first failure stops the rest"
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < N; i++)); do
  mapfile -t e < <(env_of)
  if [[ $i -eq 0 ]]; then
    env "${e[@]}" "${TRAIN[@]}" "${args[@]}" --process_id "$i" &
  else
    env "${e[@]}" "${TRAIN[@]}" "${args[@]}" --process_id "$i" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for every process; on a failure stop the others, which would otherwise wait for the failed one at
# their next collective until JAX's heartbeat timeout. (Polling: `wait -n` loses exits that happen together.)
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2> /dev/null; then still+=("$pid"); continue; fi
    status=0
    wait "$pid" || status=$?
    if [[ $status -ne 0 ]]; then
      echo "local_multiprocess: a process failed (status $status); stopping the others. Logs: $LOG_DIR" >&2
      stop_all
      wait || true
      exit "$status"
    fi
  done
  running=("${still[@]}")
  [[ ${#running[@]} -gt 0 ]] && sleep 0.5
done
echo "local_multiprocess: all $N processes finished" >&2
