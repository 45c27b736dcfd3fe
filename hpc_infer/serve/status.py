"""`hpc-infer serve status [RUN]` and `hpc-infer serve stop RUN`.

A replica's state comes from the scheduler and from the server itself, never from one
file: it is `ready` only while its job is live and the server at its address proves it
holds this run's key (serve/auth.py: proves_ours, the key never sent). A state file left
`ready` by a replica killed outright, with something else listening on its port now,
reads `ended`; a state file that failed to update (a stale NFS handle, a full quota)
cannot make a live server look failed.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from ..log import printable
from ..cluster.submit import LIVE, UNREACHABLE, recorded_backend
from ..errors import UserError
from ..rundir import RunDir, trust
from ..host.http import proves_ours
from .replica import metrics
from .serverun import REGISTRY, STATE_DIR, ServeRun


def replica_states(run: ServeRun, with_metrics: bool = False) -> list[dict]:
    backend, _ = recorded_backend(RunDir(run.root, run.fs))
    jobs = run.replica_jobs()
    sched, left = backend.states_and_time_left(list(jobs.values())) if jobs else ({}, {})
    key = run.key()
    out = []
    for i in sorted(jobs):
        f = run.state(i)
        job = jobs[i]
        js = sched.get(job, "UNKNOWN")
        base = (f.get("url") or "").removesuffix("/v1")
        live = js in LIVE or js == UNREACHABLE  # squeue silent: what the server says decides
        ours = live and bool(f.get("port")) and proves_ours(base, key, run.root, i, job)
        if ours:
            state = "ready"
        elif js in ("PENDING", "CONFIGURING"):
            state = "queued"
        elif live:
            state = "loading" if f.get("state") in (None, "loading", "ready") else f["state"]  # restarting too
            if key is None and f.get("state") == "ready":
                state = "ready?"  # not yours: nothing to prove it with
        else:
            state = f.get("state") if f.get("state") in ("failed", "stopped") else "ended"
        r = {
            "replica": i,
            "state": state,
            "job": job,
            "scheduler": js,
            "url": f.get("url"),
            "host": f.get("host"),
            "port": f.get("port"),
            "error": f.get("error"),
            "log_tail": f.get("log_tail"),
            "started": f.get("started"),
            "ready_at": f.get("ready_at"),
            "time_left": left.get(job or ""),
            "stopped_because": f.get("stopped_because"),
            "restarts": f.get("restarts", 0),
            "last_exit": f.get("last_exit"),
        }
        if with_metrics and ours:
            r["metrics"] = metrics(base, key=key)
        out.append(r)
    return out


def describe(run: ServeRun) -> str:
    spec = run.spec
    lines = [f"serve run {run.root}: model {spec['served_name']} ({spec['model']['path']}), key in {spec['key_file']}"]
    if run.level != trust.OWN:
        lines[0] += " (not yours: states as its files say, unproven; no metrics)"
    now = time.time()
    router = run.router_job()
    if router:
        r = dict(run.router_state() or {"state": "queued"})
        backend, _ = recorded_backend(RunDir(run.root, run.fs))
        js = backend.states([router]).get(router, "UNKNOWN")
        if r["state"] in ("ready", "loading") and js not in LIVE and js != UNREACHABLE:
            r["state"] = "ended"  # its file says ready; the scheduler says its job is gone: nothing answers there
            r["stopped_because"] = r.get("stopped_because") or f"its job is {js.lower()} (the file said ready)"
        line = f"  router     {r['state']:8} job {router} ({js})"
        if r.get("url"):
            line += f"  {r['url']}  policy {r.get('policy')}, sends to {len(r.get('workers') or [])} replica(s)"
        if r.get("stopped_because") or r.get("error"):
            line += f"  ({r.get('stopped_because') or r.get('error')})"
        lines.append(line)
    for r in replica_states(run, with_metrics=True):
        line = f"  replica {r['replica']}  {r['state']:8} job {r['job'] or '-'} ({r['scheduler']})"
        if r["url"]:
            line += f"  {r['url']}"
        if r["state"] == "ready" and r.get("ready_at"):
            up = now - r["ready_at"]
            m = r.get("metrics") or {}
            line += (
                f"  up {up / 60:.0f} min, {m.get('requests', 0):.0f} requests, "
                f"{m.get('generation_tokens', 0) / max(up, 1):.1f} tok/s avg"
            )
        if r.get("time_left"):
            line += f", time left {r['time_left']}"
        if r.get("stopped_because"):
            line += f"  ({r['stopped_because']})"
        if r.get("restarts"):  # the watchdog restarted its server
            line += f"  restarts {r['restarts']} (last: {r['last_exit']})"
        if r["error"] and r["state"] != "ready":
            line += f"  error: {r['error']}"
        lines.append(line)
        if r["state"] == "failed" and r.get("log_tail"):
            lines += [f"      | {t}" for t in r["log_tail"][-8:]]
    return "\n".join(printable(line) for line in lines)  # nothing from a run moves the terminal


def my_runs() -> list[Path]:
    try:
        paths = dict.fromkeys(Path(p) for p in REGISTRY.read_text().split("\n") if p.strip())
    except OSError:
        return []
    return [p for p in paths if (p / "serve.json").exists()]


def status(path: str | None) -> str:
    if path:
        return describe(ServeRun.open(path, "hpc-infer serve status", trust.SHARED))
    runs = my_runs()
    if not runs:
        return "no serve runs of yours (start one with `hpc-infer serve model=... cluster=...`)"
    out = []
    for root in runs:
        try:
            out.append(describe(ServeRun.open(root, "hpc-infer serve status", trust.SHARED)))
        except UserError as e:  # a listed run that is no longer (only) yours: said, not used
            out.append(f"serve run {root}: {e}")
    return "\n".join(out)


def stop(path: str, wait_s: float = 120.0) -> str:
    """Cancel the replicas' jobs, wait until the scheduler shows them gone, mark them stopped."""
    run = ServeRun.open(path, "hpc-infer serve stop")
    root = run.root
    backend, _ = recorded_backend(RunDir(root))
    replicas = run.replica_jobs()
    if not replicas:
        return f"{root}: no jobs recorded"
    ids = list(replicas.values())
    router = run.router_job()
    jobs = ids + ([router] if router else [])
    what = backend.cancel(jobs)
    backend.wait_ended(jobs, wait_s)
    left = _stop_servers(run)
    for i in replicas:
        run.mark_stopped(i, "hpc-infer serve stop")
    return (
        f"stopped {len(ids)} replica{'s' * (len(ids) != 1)}{' and the router' if router else ''} of {root} "
        f"({what})"
        + (
            f"; {left} server process{'es' * (left != 1)} outlived {'their replicas' if left != 1 else 'its replica'}"
            f" and {'were' if left != 1 else 'was'} stopped by PID"
            if left
            else ""
        )
    )


def _stop_servers(run: ServeRun) -> int:
    """vLLM servers (and their replica processes) the state files name on this host that are
    still running after the scheduler ended their jobs: a replica killed by SIGKILL cannot
    stop its server itself. A state file is data: a process it names is stopped only when it
    is still the one that started then and is demonstrably this run's (ours, the run
    directory in its environment: rundir/trust.py), never found by name."""
    from ..host.procs import descendants, identify, stop_all

    host = socket.gethostname()
    left = []
    for name in sorted(n for n in run.fs.listdir(STATE_DIR) if n.endswith(".json")):
        try:  # through the run's handle, judged as it is opened
            f = json.loads(run.fs.read(f"{STATE_DIR}/{name}"))
        except (UserError, OSError, ValueError):
            continue
        if not isinstance(f, dict):
            continue
        if f.get("host") != host:
            continue
        for pid, start in ((f.get("server_pid"), f.get("server_pid_start")), (f.get("pid"), f.get("pid_start"))):
            if not (isinstance(pid, int) and isinstance(start, int)):
                continue
            p = identify(pid, start)
            if p and trust.process_of_run(pid, run.root):
                left += [p] + [d for d in descendants(p.pid) if trust.process_of_run(d.pid, run.root)]
    # what they left under init when killed outright (an engine core): found by the run's mark
    left += [p for p in map(identify, trust.processes_of_run(run.root)) if p and p not in left]
    stop_all(left, grace_s=30.0)
    return len(left)
