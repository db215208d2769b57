#!/usr/bin/env bash
# Trains (or encodes, ...) on a Cloud TPU VM slice (a pod slice or a single host): one `instructor-jax`
# process per worker, started on all workers at once with `gcloud compute tpus tpu-vm ssh --worker=all`. JAX
# finds the slice's workers by itself (no coordinator flags). Two steps:
#   1. set-up (skip with SKIP_SETUP=1): this checkout, packed, goes to ~/instructor-jax on every worker
#      (or REPO_URL=... is cloned there instead), then a venv ~/instructor-jax-venv with jax[tpu] and
#      `pip install -e .[gcs]` (gcsfs, for gs:// workdirs and data);
#   2. the same command on every worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE GIN_FILE WORKDIR [GIN_BINDING ...]     # train (the original form)
#   launch/tpu_pod.sh TPU_NAME ZONE SUBCOMMAND [ARG ...]                   # any subcommand, arguments as given
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/instructor_base.gin gs://my-bucket/runs/base \
#       'TrainConfig.train_file = "gs://my-bucket/medi-data.json"'
#   SKIP_SETUP=1 launch/tpu_pod.sh my-v4-32 us-central2-b encode --model hkunlp/instructor-large \
#       --input gs://my-bucket/corpus.jsonl --output gs://my-bucket/emb/emb.npy --ids gs://my-bucket/emb/ids.txt
#   launch/tpu_pod.sh --dry-run my-v4-32 ...      # or DRY_RUN=1: print the commands, run nothing
#
# Paths are as the workers see them: GIN_FILE (or a model directory) relative to the repository there.
# WORKDIR is a gs:// URL (checkpoints through orbax from every worker; worker 0 uploads logs and exports) or
# a directory every worker mounts; MEDI .json/.jsonl may be on gs://, ArrayRecord files must be on each
# worker's disk (see launch/README.md). encode's --input and --output may be gs:// URLs (each worker reads
# its share of the input and uploads its shard; worker 0 the manifest).
# Environment: PROJECT (gcloud --project), REPO_URL, REPO_DIR (default instructor-jax, under $HOME),
# JAX_TPU_SPEC (default 'jax[tpu]'), SKIP_SETUP=1.
set -euo pipefail

source "$(dirname "$0")/common.sh"
parse_dry_run "$@"; set -- "${ARGS[@]}"
[[ $# -ge 3 ]] || usage
TPU_NAME="$1"; ZONE="$2"; shift 2
command_args "$@"
REPO_DIR="${REPO_DIR:-instructor-jax}"
VENV="${REPO_DIR}-venv"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

gcloud_args=(compute tpus tpu-vm)
project=(); [[ -n "${PROJECT:-}" ]] && project=(--project "$PROJECT")

run() {  # prints the command in dry-run mode, runs it otherwise
  if [[ "$DRY_RUN" == 1 ]]; then qall "$@"; else "$@"; fi
}
on_all_workers() {  # on_all_workers 'remote shell command'
  run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all --command "$1"
}

# --- 1. set-up
if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  if [[ -n "${REPO_URL:-}" ]]; then
    fetch="rm -rf ~/$REPO_DIR && git clone --depth 1 $(q "$REPO_URL") ~/$REPO_DIR"
  else
    archive="${TMPDIR:-/tmp}/instructor-jax-$$.tar.gz"
    run tar -czf "$archive" -C "$HERE" --exclude=.git --exclude=.venv --exclude=runs --exclude='__pycache__' \
      --exclude='*.egg-info' .
    run gcloud "${gcloud_args[@]}" scp "$archive" "$TPU_NAME:~/instructor-jax.tar.gz" --zone "$ZONE" \
      "${project[@]}" --worker=all
    fetch="rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && tar -xzf ~/instructor-jax.tar.gz -C ~/$REPO_DIR"
  fi
  on_all_workers "set -e; $fetch; python3 -m venv ~/$VENV; ~/$VENV/bin/pip install -q -U pip; \
~/$VENV/bin/pip install -q -U $(q "$JAX_TPU_SPEC"); ~/$VENV/bin/pip install -q -e ~/$REPO_DIR'[gcs]'"
fi

# --- 2. the same command on every worker; JAX detects the slice (instructor_jax.runtime.distributed, "auto").
on_all_workers "cd ~/$REPO_DIR && ~/$VENV/bin/instructor-jax $(qall "${CMD[@]}")"
