# Sourced by the launch scripts: --dry-run handling, usage text and shell quoting, written once.

# usage: prints the calling script's header comment (its documentation) and exits 2.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2; }

# q WORD: one word, shell-quoted for reading: as is, '...', "..." or printf %q.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *"'"* ]]; then printf "'%s'" "$1"
  elif [[ "$1" != *[\"\$\`\\!]* ]]; then printf '"%s"' "$1"
  else printf '%q' "$1"; fi
}
qall() { local a out=(); for a in "$@"; do out+=("$(q "$a")"); done; echo "${out[*]}"; }

# parse_dry_run "$@": sets DRY_RUN (from --dry-run or the environment) and ARGS (the rest).
parse_dry_run() {
  DRY_RUN="${DRY_RUN:-0}"
  if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
  ARGS=("$@")
}

# The instructor-jax subcommands. A launch script's first command word that is one of them starts the new
# form `SUBCOMMAND ARG ...` (passed on as given); anything else is the original training form
# `GIN_FILE WORKDIR [GIN_BINDING ...]`.
SUBCOMMANDS=(train encode eval convert data plot demo)
is_subcommand() { local s; for s in "${SUBCOMMANDS[@]}"; do [[ "$1" == "$s" ]] && return 0; done; return 1; }

# command_args "$@": sets CMD, the instructor-jax arguments of either form (prints the usage if too few).
command_args() {
  if [[ $# -ge 1 ]] && is_subcommand "$1"; then CMD=("$@"); return; fi
  [[ $# -ge 2 ]] || usage
  CMD=(train --gin_file "$1" --workdir "$2"); shift 2
  local binding; for binding in "$@"; do CMD+=(--gin_bindings "$binding"); done
}

# flag_value FLAG ARG ...: the value given to FLAG (as `FLAG VALUE` or `FLAG=VALUE`) among the ARGs, if any.
flag_value() {
  local flag="$1"; shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      "$flag") echo "${2:-}"; return ;;
      "$flag="*) echo "${1#*=}"; return ;;
    esac
    shift
  done
}

# default_log_dir ARG ...: where process logs go unless LOG_DIR says: WORKDIR/process_logs for train, beside
# the output for encode (OUTPUT's directory/process_logs), else ./process_logs (also for a URL).
default_log_dir() {
  local workdir output
  workdir="$(flag_value --workdir "$@")"; output="$(flag_value --output "$@")"
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then echo "$workdir/process_logs"
  elif [[ -n "$output" && "$output" != *://* ]]; then echo "$(dirname "$output")/process_logs"
  else echo "process_logs"; fi
}
