"""A serve run's jobs: its replicas (one array task each, numbered) and its router (one
small CPU job), and `hpc-infer serve scale`.

`serve.json` keeps what a later command needs to submit more replicas the way the first
ones were (the cluster's settings, the worker's interpreter command, the router's): no key
and no token (the key stays in its 0600 file, the token is looked up again at submission).
`serve scale` runs that interpreter command only from a serve.json that passes the trust
rule (ServeRun.open), takes replica numbers with O_EXCL and records its jobs in a file of
its own: two scales at once never share a number or lose a job.
"""

from __future__ import annotations

import dataclasses
import time

from ..cluster.submit import LIVE as LIVE_JOB, make_backend, recorded_backend
from ..config import ClusterConfig
from ..errors import UserError
from ..host.http import proves_ours
from ..rundir import RunDir
from ..secrets import exported, find_token, job_env
from .router import router_workers
from .serverun import STATE_DIR, ServeRun
from .status import replica_states

LIVE = ("ready", "loading", "queued", "restarting")


def cluster_from(spec: dict) -> ClusterConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig(name="?")), spec["cluster_config"]))


def submit_replicas(run: ServeRun, cluster: ClusterConfig, python: str, count: int) -> list[str]:
    """`count` more replicas as one array, each under a number of its own."""
    from .tasks import ServeTask

    indices = [run.new_index() for _ in range(count)]
    backend = make_backend(cluster, RunDir(run.root, run.fs), python)
    with exported(job_env(find_token(cluster.token_file))):
        return backend.submit(count, task=ServeTask(), indices=indices, kind="replicas")


def router_wanted(spec: dict, replicas: int) -> bool:
    setting = spec.get("router")
    return bool(setting) if setting is not None else replicas > 1


def router_cluster(spec: dict) -> ClusterConfig:
    """The replicas' cluster (partition, account, qos, time, setup, ...) without GPUs, on one node."""
    return dataclasses.replace(
        cluster_from(spec),
        gpus_per_task=0,
        gres=None,
        nodes_per_task=1,
        cpus_per_task=int(spec.get("router_cpus", 1)),
        mem=spec.get("router_mem"),
        array_parallelism=None,
    )


def submit_router(run: ServeRun) -> str:
    """The router's job: the replicas' cluster without GPUs, one node, serve.router_cpus and
    serve.router_mem; the host's python (the router is not part of the vLLM image)."""
    from ..cluster.submit import host_python
    from .tasks import RouterTask

    backend = make_backend(router_cluster(run.spec), RunDir(run.root, run.fs), host_python())
    (job,) = backend.submit(1, task=RouterTask(), indices=[0], kind="router")
    return job


def router_url(run: ServeRun, key: str | None) -> str | None:
    """The router's URL while its job is live, it proves it is this run's router (the proof
    names its own socket's port, "router" and its job id: serve/router_front.py) and it
    answers (its /list_workers, behind the key), else None. No key goes to the address
    before the proof: a state file names a port anyone may hold once the router is gone."""
    r = run.router_state()
    if not r or r.get("state") != "ready" or not r.get("url") or not key or not _router_alive(run):
        return None
    base = r["url"].removesuffix("/v1")
    if not proves_ours(base, key, run.root, "router", r.get("job_id", "")):
        return None
    return r["url"] if router_workers(base, key) is not None else None


def wait_router_follows(run: ServeRun, key: str, want: int, timeout_s: float = 120.0) -> list[str] | None:
    """Wait until the router sends to `want` replicas; its workers, or None if it does not answer."""
    deadline = time.monotonic() + timeout_s
    workers = None
    while time.monotonic() < deadline:
        r = run.router_state()
        if r and r.get("state") in ("failed", "stopped"):
            return None
        base = r["url"].removesuffix("/v1") if r and r.get("url") else None
        if base and _router_alive(run) and proves_ours(base, key, run.root, "router", r.get("job_id", "")):
            workers = router_workers(base, key)
            if workers is not None and len(workers) == want:
                return workers
        time.sleep(1)
    return workers


def scale(path: str, target: int) -> str:
    """`hpc-infer serve scale RUN N`: new array tasks for more replicas; for fewer, the newest
    live replicas are taken out of the router first, then cancelled."""
    if target < 0:
        raise UserError(f"serve scale: N={target} must be >= 0 (0 stops every replica; the run stays)")
    run = ServeRun.open(path, "hpc-infer serve scale")
    spec = run.spec
    if "cluster_config" not in spec or not isinstance(spec.get("python"), str):
        raise UserError(
            f"{run.root}: this serve run was started by an older hpc_infer; stop it and serve again to scale"
        )
    states = replica_states(run)
    live = [s for s in states if s["state"] in LIVE]
    key = run.key()
    if target > len(live):
        add = target - len(live)
        ids = submit_replicas(run, cluster_from(spec), spec["python"], add)
        said = f"added {add} replica{'s' * (add != 1)} ({', '.join(ids)}); {target} live"
        if router_wanted(spec, target) and not _router_alive(run):
            job = submit_router(run)
            said += f"; router job {job} started"
        return said + f". Follow with `hpc-infer serve status {run.root}`"
    if target == len(live):
        return f"{run.root}: {target} replica{'s' * (target != 1)} live already"
    going = sorted(live, key=lambda s: s["replica"], reverse=True)[: len(live) - target]
    for s in going:
        run.fs.replace(f"{STATE_DIR}/{s['replica']}.removing", f"hpc-infer serve scale {target}\n".encode())
    if _router_alive(run) and key:
        left = sum(1 for s in live if s not in going and s["state"] == "ready")
        wait_router_follows(run, key, left, timeout_s=60)
    backend, _ = recorded_backend(RunDir(run.root, run.fs))
    jobs = [s["job"] for s in going]
    for job in jobs:
        backend.cancel_one(job)
    backend.wait_ended(jobs, 120)
    for s in going:  # the replica writes why itself (it reads the mark); this covers one that could not
        run.mark_stopped(s["replica"], f"hpc-infer serve scale {target}")
    names = ", ".join(str(s["replica"]) for s in going)
    return f"removed replica{'s' * (len(going) != 1)} {names} (newest first); {target} live"


def _router_alive(run: ServeRun) -> bool:
    job = run.router_job()
    if not job:
        return False
    backend, _ = recorded_backend(RunDir(run.root, run.fs))
    return backend.states([job]).get(job) in LIVE_JOB
