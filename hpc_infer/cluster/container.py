"""Wrap the worker's python in `apptainer|singularity exec` when the cluster has an image.

The project's code (and submitit, which unpickles the job) reach the image by bind
mount + PYTHONPATH, so the image needs only vLLM. By default the environment passes
through; with `container.cleanenv` the exec gets --cleanenv and container_env.sh
forwards only the variables in `container.passenv` (Slurm's and submitit's per-task
variables, which exist only at run time, are forwarded by name pattern).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from ..config import ContainerConfig
from ..errors import UserError

CODE_MOUNT = "/opt/hpc_infer/code"
DEPS_MOUNT = "/opt/hpc_infer/deps"


def runtime_on_path(prefer: str | None = None) -> str | None:
    """The container runtime on PATH: `prefer` if given and present, else apptainer, else singularity."""
    for name in ([prefer] if prefer else []) + ["apptainer", "singularity"]:
        if shutil.which(name):
            return name
    return None


def detect_runtime(cfg: ContainerConfig) -> str:
    # Not on this host (e.g. a login node without it): assume apptainer on the compute nodes.
    return cfg.runtime or runtime_on_path() or "apptainer"


def project_root() -> Path:
    from ..config import PACKAGE_DIR

    return PACKAGE_DIR.parent


def binds(cfg: ContainerConfig, run_root: Path, model_path: str | None, hf_home: str | None,
          model_roots: list[str]) -> list[str]:
    import submitit

    out = [f"{project_root()}:{CODE_MOUNT}", f"{Path(submitit.__file__).parent}:{DEPS_MOUNT}/submitit",
           f"{run_root}:{run_root}"]
    for path in [*model_roots, hf_home, model_path]:
        if path:
            out.append(f"{path}:{path}:ro")
    out += list(cfg.binds)
    seen, unique = set(), []
    for b in out:
        if b not in seen:
            seen.add(b)
            unique.append(b)
    return unique


def exec_prefix(cfg: ContainerConfig, bind_list: list[str], gpus: bool) -> list[str]:
    """`apptainer exec [--nv] --bind ... IMAGE` (no python yet)."""
    if not cfg.image:
        raise UserError("cluster.container.image is not set")
    cmd = [detect_runtime(cfg), "exec"]
    if cfg.cleanenv:
        cmd = ["bash", str(Path(__file__).with_name("container_env.sh")), *cfg.passenv, "--", *cmd, "--cleanenv"]
    if cfg.nv and gpus:
        cmd.append("--nv")
    for b in bind_list:
        cmd += ["--bind", b]
    cmd += ["--env", f"PYTHONPATH={CODE_MOUNT}:{DEPS_MOUNT}"]
    cmd += list(cfg.extra_args)
    cmd.append(cfg.image)
    return cmd


def python_command(cfg: ContainerConfig, bind_list: list[str], gpus: bool, host_python: str) -> str:
    """The string submitit uses as `python`: the host interpreter, or one inside the image."""
    if not cfg.image:
        return shlex.quote(host_python)
    return shlex.join(exec_prefix(cfg, bind_list, gpus) + [cfg.python])
