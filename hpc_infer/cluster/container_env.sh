#!/usr/bin/env bash
# Run a --cleanenv container with only the variables the job needs.
#   container_env.sh PATTERN... -- apptainer exec --cleanenv ... IMAGE python3 ...
# Each variable whose name matches a PATTERN (a name, or a prefix ending in *) is
# exported as APPTAINERENV_<name> and SINGULARITYENV_<name>, which both runtimes pass
# into a clean environment. Only names travel on the command line, never values.
set -euo pipefail
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do patterns+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
for name in $(compgen -e); do
  for pattern in "${patterns[@]}"; do
    # shellcheck disable=SC2053  # glob match on purpose
    if [[ "$name" == $pattern ]]; then
      export "APPTAINERENV_${name}=${!name}" "SINGULARITYENV_${name}=${!name}"
      break
    fi
  done
done
exec "$@"
