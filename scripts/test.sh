#!/usr/bin/env bash
# The test command: installs what it needs, starts the local Slurm when run as root,
# then runs every test (the slow real-vLLM / real-Slurm ones included).
#   scripts/test.sh [pytest args]     e.g. scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${HPC_INFER_VENV:-.venv}
if [ "$(id -u)" = 0 ]; then
  bash slurm/local-cluster.sh
else
  echo "not root: the local Slurm cannot be started; tests marked 'slurm' will be skipped" >&2
fi
exec "$VENV/bin/python" -m pytest -ra "$@"
