"""`hpc-infer doctor` through the console script: one short job on the local Slurm as the
run would get it, one table, a fix for each failure, non-zero when the run would fail."""

from __future__ import annotations

import pytest

from conftest import require_slurm, sh, user_env


@pytest.mark.slurm
def test_doctor_on_the_local_slurm_checks_the_node_a_worker_would_get(tmp_path):
    require_slurm()
    p = sh(
        tmp_path,
        f"hpc-infer doctor cluster=slurm_local output_root={tmp_path}/runs",
        env=user_env({"HF_TOKEN": "hf_" + "x" * 30}),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for check in (
        "GPUs",
        "vLLM",
        "model",
        "HF token",
        "output root",
        "clock skew",
        "/dev/shm",
        "open files",
        "free port",
    ):
        assert check in p.stdout, (check, p.stdout)
    assert "(CPU build)" in p.stdout and "present (not shown)" in p.stdout and "hf_xxx" not in p.stdout + p.stderr
    assert "job " in p.stdout and "every check passed" in p.stderr


@pytest.mark.slurm
def test_doctor_fails_with_the_fix_when_the_run_would_fail(tmp_path):
    """GPUs asked for, none visible in the job (this machine has no driver): the run would
    fail, so doctor exits non-zero and says what to do."""
    require_slurm()
    p = sh(tmp_path, f"hpc-infer doctor cluster=slurm_local cluster.gpus_per_task=1 output_root={tmp_path}/runs")
    assert p.returncode == 1, p.stdout + p.stderr
    gpu = next(line for line in p.stdout.splitlines() if line.startswith("GPUs"))
    assert "FAIL" in gpu and "1 allocated, none visible" in gpu and "--nv" in gpu
    vllm = next(line for line in p.stdout.splitlines() if line.startswith("vLLM"))
    assert "FAIL" in vllm and "needs the CUDA build" in vllm
    assert "the run would fail" in p.stderr
