"""Render a run as a standalone, readable sbatch script (like a hand-written run_vllm.sh).

    hpc-infer sbatch model=qwen_math cluster=together data=math_r1_zero

The run is planned exactly as `launch` plans it (same run directory, so `launch` and
the script can resume each other); the script is written to <run>/job.sbatch from
the Jinja templates in slurm/templates/. A job array of workers; with
cluster.nodes_per_task > 1 each array task is one allocation of that many nodes, a Ray
head and Ray workers inside it (on a port of its own) and one vLLM worker driving them.
The token never appears in the script.
"""

from __future__ import annotations

import os

import shlex
import sys
from pathlib import Path

import jinja2
from omegaconf import DictConfig, OmegaConf

from ..models.cache import resolve_model
from ..config import RunConfig, to_run_config
from ..cluster.container import CODE_MOUNT, container_binds, exec_prefix, project_root
from .plan import plan_input, prepare
from ..cluster.preflight import check_time_limit, cpu_build_on_gpus, gpus_per_node, preflight
from .. import rundir
from ..rundir import RunDir, set_permissions
from ..secrets import find_token
from ..log import say
from ..models.fit import check_fit
from ..models.vllm_check import check_run_sampling

TEMPLATES = project_root() / "slurm" / "templates"


def sbatch_options(rc: RunConfig) -> list[str]:
    c = rc.cluster
    opts = []
    for key in ("partition", "account", "qos"):
        if getattr(c, key):
            opts.append(f"--{key}={getattr(c, key)}")
    gres = c.gres or (f"gpu:{c.gpus_per_task}" if c.gpus_per_task else None)
    if gres:
        opts.append(f"--gres={gres}")
    opts.append(f"--cpus-per-task={c.cpus_per_task}")
    if c.mem:
        opts.append(f"--mem={c.mem}")
    opts.append(f"--time={c.time}")
    opts += [o if o.startswith("-") else f"--{o}" for o in c.sbatch_extra]
    return opts


def render(rc: RunConfig, run: RunDir, model_path: str, n_tasks: int) -> str:
    c = rc.cluster
    multi = c.nodes_per_task > 1
    script_path = run.root / "job.sbatch"
    worker = ["-m", "hpc_infer.worker", str(run.root)]
    if c.container.image:
        prefix = exec_prefix(c.container, container_binds(c, rc.model, run.root, model_path), gpus=c.gpus_per_task > 0)
        python = shlex.join(prefix + [c.container.python])
    else:
        python = shlex.quote(sys.executable)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    template = env.get_template("multi_node.sbatch.j2" if multi else "single_node.sbatch.j2")
    return template.render(
        title=f"hpc_infer run {run.root.name}: model={rc.model.name} data={rc.data.name} sampling={rc.sampling.name}",
        script_path=script_path,
        run_dir=run.root,
        job_name=f"hpc_infer:{run.root.name}"[:100],
        n_tasks=n_tasks,
        array_parallelism=c.array_parallelism,
        sbatch_options=sbatch_options(rc),
        logs=run.logs,
        setup=list(c.setup),
        env=dict(c.env),
        container=bool(c.container.image),
        code_dir=project_root() if not c.container.image else CODE_MOUNT,
        worker_args=shlex.join(worker),
        nodes=c.nodes_per_task,
        tp=rc.model.tensor_parallel_size,
        pp=rc.model.pipeline_parallel_size,
        gpus_per_node=gpus_per_node(c),
        python=python,
        ray_port_min=20000,
        ray_port_max=60000,
        ray_wait_s=600,
        signal_lead_s=c.signal_lead_s,
    )


def write_script(rc: RunConfig, config_yaml: str) -> Path:
    set_permissions(rc.permissions)
    if rc.cluster.backend != "slurm":  # never a Slurm script for a non-Slurm cluster without a word
        say(
            f"cluster={rc.cluster.name} is not a Slurm cluster (backend {rc.cluster.backend}): the script assumes a "
            f"default partition, {rc.cluster.gpus_per_task} GPU(s) and the time {rc.cluster.time} per task; for your "
            f"cluster's #SBATCH lines use its config (cluster=slurm_local, together, aau_ai_cloud, or your own)"
        )
    check_time_limit(rc.cluster, rc.run_path)
    with plan_input(rc) as planned:
        checked = check_run_sampling(rc, planned.overrides, planned.input_format)
        if checked:
            print(checked, file=sys.stderr)
        wrong_build = cpu_build_on_gpus(rc.cluster)
        if wrong_build:  # the script is for another machine's environment too: said, not refused
            say(f"warning: {wrong_build}")
        model_path = resolve_model(rc.model, rc.cluster, find_token(rc.cluster.token_file))
        for note in preflight(rc.model, rc.cluster, model_path):
            print(f"[hpc_infer] {note}", file=sys.stderr)
        too_long = check_fit(rc, planned, model_path, say)
        run, _ = prepare(rc, planned, model_path, config_yaml, None, too_long)
    manifest = run.read_json("manifest.json")
    remaining = manifest["n_chunks"] - len(run.done_chunks())
    n_tasks = max(1, min(rc.cluster.workers, remaining))  # multi-node: each task one allocation, its own Ray
    return write_rendered(rc, run, model_path, n_tasks)


def write_rendered(rc: RunConfig, run: RunDir, model_path: str, n_tasks: int) -> Path:
    """<run>/job.sbatch, executable by those the run's permissions allow."""
    path = run.root / "job.sbatch"
    run.fs.replace("job.sbatch", render(rc, run, model_path, n_tasks).encode())  # a new file: never through a link
    fd = run.fs.open_file("job.sbatch")
    try:
        os.fchmod(fd, 0o777 & ~rundir.current_umask())
    finally:
        os.close(fd)
    return path


def hydra_task(cfg: DictConfig) -> None:
    """The command's work on Hydra's composed config (cli.py runs it through entry.run_hydra)."""
    path = write_script(to_run_config(cfg), OmegaConf.to_yaml(cfg, resolve=True))
    print(path)
    print(f"submit with: sbatch {path}", file=sys.stderr)
