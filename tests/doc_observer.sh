# Sourced by every non-interactive bash a test starts through conftest.user_env (BASH_ENV):
# the shell that runs a command line records it, as it starts and as it ends, so a doc
# command counts as run only when a process really ran it (conftest.py reads the record).
# Our children do not inherit it; a record we cannot write is skipped, silently.
unset BASH_ENV
if [ -n "${HPC_INFER_DOC_RAN:-}" ] && [ -n "${BASH_EXECUTION_STRING:-}" ]; then
  { printf 'start %s %s\0' "$$" "$BASH_EXECUTION_STRING" >> "$HPC_INFER_DOC_RAN"; } 2>/dev/null
  trap '{ printf "exit %s %s\0" "$$" "$?" >> "$HPC_INFER_DOC_RAN"; } 2>/dev/null' EXIT
fi
