#!/usr/bin/env bash
# The test command: installs what it needs, starts the local Slurm when run as root,
# then runs every test (the slow real-vLLM / real-Slurm ones included).
#   scripts/test.sh [pytest args]     e.g. scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${HPC_INFER_VENV:-.venv}
# The daemons this run starts are recorded here and stopped when the tests end
# (HPC_INFER_KEEP_SLURM=1 keeps them running); a Slurm that was already up is left alone.
export HPC_INFER_SLURM_PIDS=${HPC_INFER_SLURM_PIDS:-$(mktemp -t hpc_infer-slurm.XXXXXX)}
if [ "$(id -u)" = 0 ]; then
  bash slurm/local-cluster.sh
  [ "${HPC_INFER_KEEP_SLURM:-0}" = 1 ] || trap 'bash slurm/local-cluster.sh stop >&2' EXIT
else
  echo "not root: the local Slurm cannot be started; tests marked 'slurm' will be skipped" >&2
fi
START=$(date +%s)
# lint and format first: a minute at most, and a red one ends the run before the long suite
"$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check .
# two workers, a file at a time each (tests/conftest.py orders the files, longest first): much of
# the suite waits on Slurm's timers and on processes starting, which the other worker overlaps.
# HPC_INFER_TEST_WORKERS=0 runs it in one process.
WORKERS=${HPC_INFER_TEST_WORKERS:-2}
XDIST=()
[ "$WORKERS" = 0 ] || XDIST=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
rc=0
"$VENV/bin/python" -m pytest -ra "${XDIST[@]}" "$@" || rc=$?
echo "test suite: $(( $(date +%s) - START )) s on $(nproc) cores; CPU flags: $(grep -o -w -E 'avx512f|avx2|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2
exit $rc
