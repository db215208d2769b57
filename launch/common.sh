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
