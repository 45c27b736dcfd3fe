#!/usr/bin/env bash
# Host side of a container run: `container_exec.sh [--requests DIR] [PATTERN...] -- apptainer exec ...`
#
# PATTERN (with --cleanenv): each variable whose name matches (a name, or a prefix ending
# in *) is exported as APPTAINERENV_<name> and SINGULARITYENV_<name>, which both runtimes
# pass into a clean environment. Only names travel on the command line, never values.
#
# --requests DIR (under Slurm): inside the image, submitit's `scontrol requeue JOB` cannot
# reach Slurm (no munge socket, usually no scontrol). hpc_infer's shim, first on the
# container's PATH, writes the request into a box under DIR (the run directory, which is
# bound), and this script performs it here, on the host, when the container has exited.
# Slurm signals every process of a step, the container's included, so the signals are
# only caught here (kept from killing this script), not forwarded.
set -uo pipefail
requests=""
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  if [ "$1" = "--requests" ]; then requests=$2; shift 2; else patterns+=("$1"); shift; fi
done
[ "${1:-}" = "--" ] && shift
for name in $(compgen -e); do
  for pattern in "${patterns[@]+"${patterns[@]}"}"; do
    # shellcheck disable=SC2053  # glob match on purpose
    if [[ "$name" == $pattern ]]; then
      export "APPTAINERENV_${name}=${!name}" "SINGULARITYENV_${name}=${!name}"
      break
    fi
  done
done
if [ -z "$requests" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
  exec "$@"
fi
mkdir -p "$requests"
box=$(mktemp -d "$requests/requeue.XXXXXX")
export APPTAINERENV_HPC_INFER_REQUEUE_DIR="$box" SINGULARITYENV_HPC_INFER_REQUEUE_DIR="$box"
trap ':' USR1 USR2 TERM INT HUP
"$@" &
child=$!
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # a caught signal ended `wait`, not the container
done
if [ -s "$box/requests" ]; then
  while read -r job; do
    [ -n "$job" ] && scontrol requeue "$job" && echo "hpc_infer: requeued $job for the container (scontrol on the host)" >&2
  done < "$box/requests"
fi
rm -rf "$box"
exit "$rc"
