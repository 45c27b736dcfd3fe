"""A serve run's jobs: its replicas (one array task each, index = replica number) and its
router (one small CPU job, kept apart in jobs.json's "router"), and `hpc-infer serve scale`.

`serve.json` keeps what a later command needs to submit more replicas the way the first
ones were (the cluster's settings, the worker's interpreter command, the router's): no key
and no token (the key stays in its 0600 file, the token is looked up again at submission).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..cluster.submit import LIVE as LIVE_JOB, make_backend, recorded_backend
from ..config import ClusterConfig
from ..errors import UserError
from ..secrets import exported, find_token, job_env
from ..rundir import RunDir, read_json, write_atomic, write_json
from .router import ROUTER_STATE, removing_marker, router_workers
from .replica import STATE_DIR

LIVE = ("ready", "loading", "queued", "restarting")


def cluster_from(spec: dict) -> ClusterConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig(name="?")), spec["cluster_config"]))


def submit_replicas(root: Path, cluster: ClusterConfig, python: str, count: int, start: int) -> list[str]:
    """Replicas start..start+count-1 as one array (recorded in jobs.json's launches, in order)."""
    from ..cluster.task import ServeTask

    backend = make_backend(cluster, RunDir(root), python)
    with exported(job_env(find_token(cluster.token_file))):
        return backend.submit(count, task=ServeTask(), start=start)


def router_wanted(spec: dict, replicas: int) -> bool:
    setting = spec.get("router")
    return bool(setting) if setting is not None else replicas > 1


def router_job(root: Path) -> str | None:
    run = RunDir(root)
    return (read_json(run.jobs).get("router") or None) if run.jobs.exists() else None


def router_cluster(spec: dict) -> ClusterConfig:
    """The replicas' cluster (partition, account, qos, time, setup, ...) without GPUs, on one node."""
    return dataclasses.replace(cluster_from(spec), gpus_per_task=0, gres=None, nodes_per_task=1,
                               cpus_per_task=int(spec.get("router_cpus", 1)), mem=spec.get("router_mem"),
                               array_parallelism=None)


def submit_router(root: Path, spec: dict) -> str:
    """The router's job: the replicas' cluster without GPUs, one node, serve.router_cpus and
    serve.router_mem; the host's python (the router is not part of the vLLM image)."""
    from ..cluster.submit import host_python
    from ..cluster.task import RouterTask

    run = RunDir(root)
    (job,) = make_backend(router_cluster(spec), run, host_python()).submit(1, task=RouterTask(), record=False)
    jobs = read_json(run.jobs) if run.jobs.exists() else {"launches": []}
    jobs["router"] = job
    write_json(run.jobs, jobs)
    return job


def router_state(root: Path) -> dict | None:
    try:
        return json.loads((root / STATE_DIR / ROUTER_STATE).read_text())
    except (OSError, ValueError):
        return None


def router_url(root: Path, key: str | None) -> str | None:
    """The router's URL while it answers (its /list_workers, behind the key), else None."""
    r = router_state(root)
    if not r or r.get("state") != "ready" or not r.get("url") or not key:
        return None
    return r["url"] if router_workers(r["url"].removesuffix("/v1"), key) is not None else None


def wait_router_follows(root: Path, key: str, want: int, timeout_s: float = 120.0) -> list[str] | None:
    """Wait until the router sends to `want` replicas; its workers, or None if it does not answer."""
    deadline = time.time() + timeout_s
    workers = None
    while time.time() < deadline:
        r = router_state(root)
        if r and r.get("state") in ("failed", "stopped"):
            return None
        if r and r.get("url"):
            workers = router_workers(r["url"].removesuffix("/v1"), key)
            if workers is not None and len(workers) == want:
                return workers
        time.sleep(1)
    return workers


def scale(run: str, target: int) -> str:
    """`hpc-infer serve scale RUN N`: new array tasks for more replicas; for fewer, the newest
    live replicas are taken out of the router first, then cancelled."""
    from .status import _key, mark_stopped, replica_states, serve_root

    if target < 0:
        raise UserError(f"serve scale: N={target} must be >= 0 (0 stops every replica; the run stays)")
    root = serve_root(run)
    spec = json.loads((root / "serve.json").read_text())
    if "cluster_config" not in spec:
        raise UserError(f"{root}: this serve run was started by an older hpc_infer; stop it and serve again to scale")
    states = replica_states(root)
    live = [s for s in states if s["state"] in LIVE]
    key = _key(spec)
    if target > len(live):
        add = target - len(live)
        start = len(states)
        spec["replicas"] = start + add
        write_atomic(root / "serve.json", (json.dumps(spec, indent=1) + "\n").encode())
        ids = submit_replicas(root, cluster_from(spec), spec["python"], add, start)
        said = f"added {add} replica{'s' * (add != 1)} ({', '.join(ids)}); {target} live"
        if router_wanted(spec, target) and not _router_alive(root):
            job = submit_router(root, spec)
            said += f"; router job {job} started"
        return said + f". Follow with `hpc-infer serve status {root}`"
    if target == len(live):
        return f"{root}: {target} replica{'s' * (target != 1)} live already"
    going = sorted(live, key=lambda s: s["replica"], reverse=True)[:len(live) - target]
    for s in going:
        removing_marker(root, s["replica"]).write_text(f"hpc-infer serve scale {target}\n")
    if _router_alive(root) and key:
        left = sum(1 for s in live if s not in going and s["state"] == "ready")
        wait_router_follows(root, key, left, timeout_s=60)
    backend, _ = recorded_backend(RunDir(root))
    jobs = [s["job"] for s in going]
    for job in jobs:
        backend.cancel_one(job)
    backend.wait_ended(jobs, 120)
    for s in going:  # the replica writes why itself (it reads the mark); this covers one that could not
        mark_stopped(root, s["replica"], f"hpc-infer serve scale {target}")
    names = ", ".join(str(s["replica"]) for s in going)
    return f"removed replica{'s' * (len(going) != 1)} {names} (newest first); {target} live"


def _router_alive(root: Path) -> bool:
    job = router_job(root)
    if not job:
        return False
    backend, _ = recorded_backend(RunDir(root))
    return backend.states([job]).get(job) in LIVE_JOB

