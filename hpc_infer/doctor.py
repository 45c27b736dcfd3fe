"""`hpc-infer doctor [overrides]`: before a big run, one short job on the cluster as the run
would get it (the same partition, GPUs, container and interpreter), checking the node the
way a worker meets it (worker/probe.py), and one table with a fix for each failure. Exits
non-zero when the run would fail. Nothing is downloaded: the model must resolve without a
fetch (a shared path, the catalog, the hub cache)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from .cluster.container import worker_python
from .cluster.submit import BACKENDS, TERMINAL, make_backend
from .config import RunConfig, to_run_config
from .errors import UserError
from .log import printable, say
from .models.cache import resolve_model
from .rundir import RunDir, write_json
from .secrets import exported, find_token, job_env


def doctor(rc: RunConfig) -> int:
    c = rc.cluster
    BACKENDS[c.backend].check_reachable(c)
    token = find_token(c.token_file)
    try:
        model_path = resolve_model(rc.model, c, token, download=False)
    except UserError as e:
        model_path = None
        say(f"the model does not resolve here without a download: {e}")
    root = Path(rc.output_root).expanduser().resolve() / f"doctor__{c.name}"
    shutil.rmtree(root, ignore_errors=True)
    run = RunDir(root)
    run.make()
    spec = {
        "gpus": c.gpus_per_task,
        "model_path": model_path,
        "tensor_parallel_size": rc.model.tensor_parallel_size,
        "multi_node": c.nodes_per_task > 1,
        "slurm": c.backend == "slurm",
        "gated": bool(getattr(rc.model, "gated", False)),
    }
    write_json(root / "doctor_spec.json", spec)
    say(f"one {c.backend} task on partition {c.partition or '(default)'} with {c.gpus_per_task} GPU(s): {root}")
    if c.backend == "debug":
        from .worker.probe import run_probe

        run_probe(root)
    else:
        from .cluster.task import DoctorTask

        backend = make_backend(c, run, worker_python(rc, run, model_path or ""))
        with exported(job_env(token)):
            (job,) = backend.submit(1, task=DoctorTask(), indices=[0])
        while not (root / "doctor.json").exists():
            if backend.states([job]).get(job) in TERMINAL and not (root / "doctor.json").exists():
                raise UserError(
                    f"the doctor task {job} ended without a result: the job could not start the interpreter "
                    f"(cluster.python, cluster.container.image) or was refused; see {run.logs}"
                )
            time.sleep(1)
    fs = RunDir(root).fs  # read back through the pinned handle
    rows = json.loads(fs.read("doctor.json"))["checks"]
    if model_path is None:
        rows.insert(
            0,
            {
                "check": "model",
                "status": "fail",
                "found": "not resolved on the login node",
                "fix": "model.path to a shared copy, or `hpc-infer cache stage` it first",
            },
        )
    print(table(rows))
    failed = [r for r in rows if r["status"] == "fail"]
    say(f"{len(failed)} check(s) failed: the run would fail" if failed else "every check passed")
    return 1 if failed else 0


def table(rows: list[dict]) -> str:
    lines = [f"{'check':14} {'':5} {'found':60} fix"]
    for r in rows:
        lines.append(
            f"{printable(r['check'])[:14]:14} {printable(r['status']).upper():5} {printable(r['found'])[:60]:60} "
            f"{printable(r.get('fix') or '')}"
        )
    return "\n".join(lines)


def hydra_task(cfg: DictConfig) -> None:
    """The command's work on Hydra's composed config (cli.py runs it through entry.run_hydra)."""
    code = doctor(to_run_config(cfg))
    if code:
        raise SystemExit(code)
