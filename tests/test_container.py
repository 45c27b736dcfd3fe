"""Container wrapping. No Apptainer/Singularity can be installed on these machines
(none is packaged for Debian 12 here), so these tests check the exact command lines
that would run; where a runtime exists the same code paths run for real."""

import shlex
import shutil
from pathlib import Path

import submitit

from conftest import compose, skip_or_fail
from hpc_infer.cluster.container import CODE_MOUNT, DEPS_MOUNT, SHIM_DIR, binds, python_command
from hpc_infer.rundir import RunDir
from hpc_infer.run.sbatch import render
from hpc_infer.secrets import Token, job_env
from hpc_infer.cluster.submit import SlurmBackend

ROOT = Path(__file__).resolve().parent.parent


def aau(tmp_path, *extra):
    image = tmp_path / "vllm-openai_latest.sif"
    image.touch()
    return compose("cluster=aau_ai_cloud", f"cluster.container.image={image}", f"output_root={tmp_path}", *extra), image


def test_exec_line_for_submitit(tmp_path):
    rc, image = aau(tmp_path, "cluster.model_roots=[/shared/models]")
    run = RunDir(tmp_path / "run")
    c = rc.cluster.container
    cmd = python_command(
        c,
        binds(c, run.root, "/shared/models/m", None, rc.cluster.model_roots),
        gpus=True,
        host_python="/usr/bin/python3",
    )
    subm = Path(submitit.__file__).parent
    assert shlex.split(cmd) == [
        "singularity",
        "exec",
        "--nv",
        "--bind",
        f"{ROOT / 'hpc_infer'}:{CODE_MOUNT}/hpc_infer",
        "--bind",
        f"{subm}:{DEPS_MOUNT}/submitit",
        "--bind",
        f"{run.root}:{run.root}",
        "--bind",
        "/shared/models:/shared/models:ro",
        "--bind",
        "/shared/models/m:/shared/models/m:ro",
        "--env",
        f"PYTHONPATH={CODE_MOUNT}:{DEPS_MOUNT}",
        "--env",
        f"PREPEND_PATH={SHIM_DIR}",
        str(image),
        "python3",
    ]
    # submitit puts exactly this in front of `-u -m submitit.core._submit` in the sbatch file
    if not shutil.which("srun"):  # submitit's executor refuses to exist without it
        skip_or_fail("submitit's SlurmExecutor needs `srun` on PATH (slurm-wlm; scripts/test.sh installs it)")
    backend = SlurmBackend(rc.cluster, run, cmd)
    ex = backend.executor()
    assert ex._submitit_command_str.startswith(cmd + " -u -m submitit.core._submit")
    assert ex.parameters["gres"] == "gpu:1" and ex.parameters["mem"] == "40G" and ex.parameters["time"] == 240


def test_no_image_means_host_python(tmp_path):
    rc = compose("cluster=together")
    assert python_command(rc.cluster.container, [], gpus=True, host_python="/venv/bin/python") == "/venv/bin/python"


def test_token_reaches_images_through_env_only():
    env = job_env(Token("hf_abc", "test"))
    assert env == {"HF_TOKEN": "hf_abc", "APPTAINERENV_HF_TOKEN": "hf_abc", "SINGULARITYENV_HF_TOKEN": "hf_abc"}
    assert "hf_abc" not in repr(Token("hf_abc", "test"))


def test_rendered_container_script(tmp_path):
    rc, image = aau(tmp_path)
    run = RunDir(tmp_path / "run")
    run.make()
    text = render(rc, run, "/models/m", n_tasks=4)
    assert "#SBATCH --gres=gpu:1\n#SBATCH --cpus-per-task=16\n#SBATCH --mem=40G\n#SBATCH --time=04:00:00" in text
    assert "#SBATCH --array=0-3\n" in text
    assert f"singularity exec --nv --bind {ROOT / 'hpc_infer'}:{CODE_MOUNT}/hpc_infer" in text
    assert f"{image} python3)\n" in text  # the image's interpreter, defined once (py=(...))
    assert f'"${{py[@]}}" -m hpc_infer.worker {run.root} --worker-id' in text
    assert 'APPTAINERENV_HF_TOKEN="${HF_TOKEN:-}"' in text  # a reference, never a value


def test_cleanenv_exec_line_and_forwarding_wrapper(tmp_path):
    """--cleanenv: the exact exec line, then the wrapper itself run for real (with `env`
    standing where `apptainer exec ...` would be): matching variables are forwarded as
    APPTAINERENV_/SINGULARITYENV_, others are not, and no value is on any command line."""
    import os
    import subprocess

    rc, image = aau(tmp_path, "cluster.container.cleanenv=true", "cluster.container.passenv=[SLURM_*,HF_TOKEN]")
    c = rc.cluster.container
    cmd = shlex.split(python_command(c, [], gpus=True, host_python="/usr/bin/python3"))
    wrapper = str(ROOT / "hpc_infer" / "cluster" / "container_exec.sh")
    assert cmd[:6] == ["bash", wrapper, "SLURM_*", "HF_TOKEN", "--", "singularity"]
    assert cmd[6:9] == ["exec", "--cleanenv", "--nv"] and cmd[-2:] == [str(image), "python3"]
    env = {
        "PATH": os.environ["PATH"],
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_JOB_ID": "77",
        "HF_TOKEN": "hf_secret_x",
        "UNRELATED": "no",
    }
    out = subprocess.run(
        ["bash", wrapper, *c.passenv, "--", "env"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "APPTAINERENV_SLURM_ARRAY_TASK_ID=3" in out and "SINGULARITYENV_SLURM_JOB_ID=77" in out
    assert "APPTAINERENV_HF_TOKEN=hf_secret_x" in out
    assert not any(line.startswith(("APPTAINERENV_UNRELATED", "APPTAINERENV_PATH")) for line in out)
    assert "hf_secret_x" not in " ".join(cmd)
