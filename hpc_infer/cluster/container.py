"""Wrap the worker's python in `apptainer|singularity exec` when the cluster has an image.

The hpc_infer package (and submitit, which unpickles the job) reach the image by bind
mount + PYTHONPATH, so the image needs only vLLM. Only the package directory is bound,
never the folder holding it: for an installed (non-editable) hpc_infer that folder is
the host's site-packages, whose torch and vLLM would shadow the image's. Slurm requeues
that submitit asks for inside the image are relayed to the host (container_exec.sh,
container_bin/scontrol).

A container sees only the image, the runtime's default mounts and our binds. Every
path the worker reads is bound here (run directory, model with the targets of its
symlinks, chat template, LoRA adapter, shared caches); `check_paths` finds, before
anything is submitted, a bind whose source is missing and a path in `cluster.env`
that the container would not see. By default the environment passes
through; with `container.cleanenv` the exec gets --cleanenv and container_exec.sh
forwards only the variables in `container.passenv` (Slurm's and submitit's per-task
variables, which exist only at run time, are forwarded by name pattern).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from ..config import ClusterConfig, ContainerConfig, ModelConfig
from ..errors import UserError

CODE_MOUNT = "/opt/hpc_infer/code"
DEPS_MOUNT = "/opt/hpc_infer/deps"
SHIM_DIR = f"{CODE_MOUNT}/hpc_infer/cluster/container_bin"  # our `scontrol`, first on the container's PATH


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


def link_target_dirs(model_path: str | None) -> list[str]:
    """Folders that symlinks inside the model directory point into (a Hugging Face cache
    snapshot links to ../../blobs): binding the snapshot alone would leave them dangling."""
    if not model_path or not os.path.isdir(model_path):
        return []
    root = os.path.abspath(model_path)
    out: list[str] = []
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            link = os.path.join(here, name)
            if os.path.islink(link):
                target = os.path.normpath(os.path.join(here, os.readlink(link)))
                folder = target if os.path.isdir(target) else os.path.dirname(target)
                if not _under(folder, [root]) and folder not in out:
                    out.append(folder)
    return out


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def binds(
    cfg: ContainerConfig,
    run_root: Path | None,
    model_path: str | None,
    hf_home: str | None,
    model_roots: list[str],
    files: list[str | None] = (),
    writes: list[str | None] = (),
) -> list[str]:
    """`src:dst[:ro]` for everything the worker touches; `files` are further read-only
    inputs (a LoRA adapter; the chat template travels inside worker.json); `writes` are
    shared directories the worker writes (the compile cache). Paths with `$VARS` are the
    node's own (expanded there) and not bound."""
    import submitit

    from ..config import PACKAGE_DIR

    out = [f"{PACKAGE_DIR}:{CODE_MOUNT}/hpc_infer", f"{Path(submitit.__file__).parent}:{DEPS_MOUNT}/submitit"]
    if run_root:
        out.append(f"{run_root}:{run_root}")
    reads = [*model_roots, hf_home, model_path, *link_target_dirs(model_path)]
    reads += [os.path.realpath(os.path.expanduser(f)) for f in files if f]
    for path in reads:
        if path:
            out.append(f"{path}:{path}:ro")
    for path in writes:
        if path and "$" not in path:
            path = os.path.realpath(os.path.expanduser(path))
            out.append(f"{path}:{path}")
    out += list(cfg.binds)
    seen, unique = set(), []
    for b in out:
        if b not in seen:
            seen.add(b)
            unique.append(b)
    return unique


def container_binds(cluster: ClusterConfig, model: ModelConfig, run_root: Path | None, model_path: str) -> list[str]:
    return binds(
        cluster.container,
        run_root,
        model_path,
        cluster.hf_home,
        cluster.model_roots,
        [model.lora_path],
        [cluster.compile_cache],
    )


def exec_prefix(cfg: ContainerConfig, bind_list: list[str], gpus: bool, requests: Path | None = None) -> list[str]:
    """`apptainer exec [--nv] --bind ... IMAGE` (no python yet), behind container_exec.sh
    when variables are forwarded (--cleanenv) or Slurm requeues are relayed (`requests`)."""
    if not cfg.image:
        raise UserError("cluster.container.image is not set")
    cmd = [detect_runtime(cfg), "exec"]
    if cfg.cleanenv:
        cmd.append("--cleanenv")
    if cfg.nv and gpus:
        cmd.append("--nv")
    for b in bind_list:
        cmd += ["--bind", b]
    cmd += ["--env", f"PYTHONPATH={CODE_MOUNT}:{DEPS_MOUNT}", "--env", f"PREPEND_PATH={SHIM_DIR}"]
    cmd += list(cfg.extra_args)
    cmd.append(cfg.image)
    if cfg.cleanenv or requests:
        head = ["bash", str(Path(__file__).with_name("container_exec.sh"))]
        head += ["--requests", str(requests)] if requests else []
        cmd = head + (list(cfg.passenv) if cfg.cleanenv else []) + ["--"] + cmd
    return cmd


def python_command(
    cfg: ContainerConfig, bind_list: list[str], gpus: bool, host_python: str, requests: Path | None = None
) -> str:
    """The string submitit uses as `python`: the host interpreter (or the cluster's
    `python` command, as given), or one inside the image."""
    if not cfg.image:
        return host_python if " " in host_python else shlex.quote(host_python)
    return shlex.join(exec_prefix(cfg, bind_list, gpus, requests) + [cfg.python])


def visible_roots(cfg: ContainerConfig, bind_list: list[str]) -> list[str]:
    """Where the container sees host paths: our binds' destinations and the runtime's
    default mounts ($HOME unless --no-home/--contain, /tmp and /var/tmp unless --contain)."""
    flags = set(cfg.extra_args)
    contain = bool(flags & {"--contain", "-c", "--containall", "-C"})
    roots = [b.split(":")[1] if ":" in b else b for b in bind_list]
    if not contain:
        roots += ["/tmp", "/var/tmp"]
        if "--no-home" not in flags:
            roots.append(os.path.expanduser("~"))
    return roots


def check_paths(cfg: ContainerConfig, bind_list: list[str], env: dict[str, str]) -> list[str]:
    """What would break inside the container, each naming the setting and the fix:
    a bind source that does not exist here (Apptainer refuses to start), and a path in
    `cluster.env` that exists here but would not be seen inside."""
    problems = []
    for spec in cfg.binds:
        src = spec.split(":")[0]
        if not os.path.exists(os.path.expanduser(src)):
            problems.append(
                f"cluster.container.binds: {spec}: {src} does not exist on this machine, and Apptainer "
                f"refuses to start a container whose bind source is missing; fix the path or drop the "
                f"bind"
            )
    roots = visible_roots(cfg, bind_list)
    for key, value in env.items():
        for part in str(value).split(":"):
            if part.startswith("/") and os.path.exists(part) and not _under(os.path.normpath(part), roots):
                problems.append(
                    f"cluster.env.{key}: {part} is not visible inside the container (not under a bind "
                    f"or a default mount); add it to cluster.container.binds, e.g. "
                    f"'cluster.container.binds=[{part}]'"
                )
    return problems


def worker_python(rc, run, model_path: str) -> str:
    """The interpreter command a run's workers are started with: the host's python, or the
    same inside the cluster's image (binds for the run, the model and its links)."""
    from .submit import host_python

    c = rc.cluster
    bind_list = container_binds(c, rc.model, run.root, model_path) if c.container.image else []
    requests = run.logs / "requeue" if c.backend == "slurm" else None
    return python_command(
        c.container, bind_list, gpus=c.gpus_per_task > 0, host_python=c.python or host_python(), requests=requests
    )
