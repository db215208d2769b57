#!/usr/bin/env bash
# Writes an sbatch script that trains (or encodes, ...) on NODES GPU nodes of a SLURM cluster, and submits
# it with sbatch. In the job, `srun` starts the same `instructor-jax` command in every task:
#   MODE=per-node (default): one task per node, seeing all GPUS_PER_NODE GPUs of its node; the tasks join
#     through explicit flags: --coordinator_address <first node>:PORT --num_processes $SLURM_NTASKS
#     --process_id $SLURM_PROCID (read in each task);
#   MODE=per-gpu: one task per GPU and no flags: JAX's SLURM detection finds the coordinator, the process
#     count and id, and gives task SLURM_LOCALID the node's GPU of that index (so every task must see all
#     of its node's GPUs: do not add --gpus-per-task or --gpu-bind).
#
#   launch/slurm.sh NODES GIN_FILE WORKDIR [GIN_BINDING ...]      # train (the original form)
#   launch/slurm.sh NODES SUBCOMMAND [ARG ...]                    # any subcommand (encode, ...), arguments as given
#   GPUS_PER_NODE=8 PARTITION=gpu launch/slurm.sh 4 configs/instructor_large.gin /shared/runs/large \
#       'TrainConfig.train_file = "/shared/data/medi.array_record"'
#   launch/slurm.sh 4 encode --model /shared/models/large --input /shared/corpus.jsonl \
#       --output /shared/emb/emb.npy --ids /shared/emb/ids.txt      # one shard per task, and a manifest
#   launch/slurm.sh --dry-run 2 configs/tiny.gin /shared/runs/tiny    # or DRY_RUN=1: print the script only
#
# WORKDIR (or encode's --input, --output, --model) must be on a filesystem every node mounts (checkpoints
# and shards are written by all processes).
# Environment: MODE, GPUS_PER_NODE (8), PORT (per-node mode; default 12000 + job id % 4000), PARTITION,
# ACCOUNT, TIME (24:00:00), JOB_NAME (instructor-jax), VENV (a virtualenv to activate in the job;
# default: instructor-jax from PATH), SBATCH_FILE (where the script is written; default a temp file).
set -euo pipefail

source "$(dirname "$0")/common.sh"
parse_dry_run "$@"; set -- "${ARGS[@]}"
[[ $# -ge 2 ]] || usage
NODES="$1"; shift
command_args "$@"
MODE="${MODE:-per-node}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

train=("${CMD[@]}")

case "$MODE" in
  per-node) tasks_per_node=1 ;;
  per-gpu) tasks_per_node="$GPUS_PER_NODE" ;;
  *) echo "MODE must be per-node or per-gpu, got '$MODE'" >&2; exit 2 ;;
esac

script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=${JOB_NAME:-instructor-jax}"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --time=${TIME:-24:00:00}"
  [[ -n "${PARTITION:-}" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "${ACCOUNT:-}" ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "set -euo pipefail"
  echo "cd $(q "$HERE")"
  [[ -n "${VENV:-}" ]] && echo "source $(q "$VENV/bin/activate")"
  if [[ "$MODE" == per-node ]]; then
    echo "export COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):${PORT:-\$((12000 + SLURM_JOB_ID % 4000))}\""
    echo "# One task per node. SLURM_NTASKS and SLURM_PROCID are read inside each task (hence bash -c)."
    echo "srun --kill-on-bad-exit=1 bash -c 'exec instructor-jax \"\$@\" --coordinator_address \"\$COORDINATOR\" \\"
    echo "    --num_processes \"\$SLURM_NTASKS\" --process_id \"\$SLURM_PROCID\"' _ \\"
    echo "  $(qall "${train[@]}")"
  else
    echo "# One task per GPU; JAX detects SLURM (coordinator: first node, port from the job id)."
    echo "srun --kill-on-bad-exit=1 instructor-jax $(qall "${train[@]}")"
  fi
}

if [[ "$DRY_RUN" == 1 ]]; then
  script
  echo "# (dry run: not submitted; without --dry-run this is written to a file and passed to sbatch)"
  exit 0
fi
SBATCH_FILE="${SBATCH_FILE:-$(mktemp "${TMPDIR:-/tmp}/instructor-jax-XXXXXX.sbatch")}"
script > "$SBATCH_FILE"
echo "wrote $SBATCH_FILE" >&2
sbatch "$SBATCH_FILE"
