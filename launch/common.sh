# Shared helpers for launch/*.sh (sourced, not run). DRY_RUN=1 prints each command instead of
# running it, shell-quoted so that the printed line can be pasted and run as is.

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# Quote all arguments into one shell-safe string: plain words stay bare, the rest single-quoted.
q() {
  local out="" a sq="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/$sq}' "; fi
  done
  printf '%s' "${out% }"
}

# Run a command (or print it with DRY_RUN=1). Output of dry runs goes to stdout, prefixed "+ ".
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $(q "$@")"; else "$@"; fi
}

# Print-or-run a whole shell line (pipes, redirections, &): used for detached or tee'd runs.
run_sh() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $1"; else bash -c "$1"; fi
}

# The interpreter: the repo's .venv if there is one, else python3.
repo_python() {
  if [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"; else echo python3; fi
}
