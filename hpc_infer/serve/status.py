"""`hpc-infer serve status [RUN]` and `hpc-infer serve stop RUN`.

A replica's state comes from the scheduler and from its `/health`, never from one file:
a state file that failed to update (a stale NFS handle, a full quota) cannot make a live
server look failed, nor a dead one look ready.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from ..cluster.submit import UNREACHABLE, recorded_backend
from ..errors import UserError
from ..rundir import RunDir, write_atomic
from .replica import STATE_DIR, http, metrics

CONFIG_DIR = Path.home() / ".config" / "hpc_infer"
KEYS_DIR = CONFIG_DIR / "keys"
REGISTRY = CONFIG_DIR / "serve_runs"  # every serve run this user started, one path a line


def _key(spec: dict) -> str | None:
    try:
        return Path(spec["key_file"]).expanduser().read_text().strip()
    except (KeyError, OSError):
        return None


def replica_states(root: Path, with_metrics: bool = False) -> list[dict]:
    spec = json.loads((root / "serve.json").read_text())
    backend, ids = recorded_backend(RunDir(root))
    sched, left = backend.states_and_time_left(ids) if ids else ({}, {})
    out = []
    for i in range(int(spec.get("replicas", 1))):
        try:
            f = json.loads((root / STATE_DIR / f"{i}.json").read_text())
        except (OSError, ValueError):
            f = {}
        job = ids[i] if i < len(ids) else None
        js = sched.get(job, "UNKNOWN") if job else "NOT SUBMITTED"
        base = (f.get("url") or "").removesuffix("/v1")
        healthy = bool(f.get("port")) and http(f"{base}/health", timeout=3)[0] == 200
        if healthy:
            state = "ready"
        elif js in ("PENDING", "CONFIGURING"):
            state = "queued"
        elif js in ("RUNNING", "COMPLETING", UNREACHABLE):  # squeue silent: what the file says, not "ended"
            state = "loading" if f.get("state") in (None, "loading", "ready") else f["state"]  # restarting too
        else:
            state = f.get("state") if f.get("state") in ("failed", "stopped") else "ended"
        r = {"replica": i, "state": state, "job": job, "scheduler": js, "url": f.get("url"), "host": f.get("host"),
             "port": f.get("port"), "error": f.get("error"), "log_tail": f.get("log_tail"),
             "started": f.get("started"), "ready_at": f.get("ready_at"), "time_left": left.get(job or ""),
             "stopped_because": f.get("stopped_because"), "restarts": f.get("restarts", 0),
             "last_exit": f.get("last_exit")}
        if with_metrics and healthy:
            r["metrics"] = metrics(base, key=_key(spec))
        out.append(r)
    return out


def describe(root: Path) -> str:
    spec = json.loads((root / "serve.json").read_text())
    lines = [f"serve run {root}: model {spec['served_name']} ({spec['model']['path']}), key in {spec['key_file']}"]
    now = time.time()
    from .fleet import router_job, router_state

    router = router_job(root)
    if router:
        r = router_state(root) or {"state": "queued"}
        line = f"  router     {r['state']:8} job {router}"
        if r.get("url"):
            line += f"  {r['url']}  policy {r.get('policy')}, sends to {len(r.get('workers') or [])} replica(s)"
        if r.get("stopped_because") or r.get("error"):
            line += f"  ({r.get('stopped_because') or r.get('error')})"
        lines.append(line)
    for r in replica_states(root, with_metrics=True):
        line = f"  replica {r['replica']}  {r['state']:8} job {r['job'] or '-'} ({r['scheduler']})"
        if r["url"]:
            line += f"  {r['url']}"
        if r["state"] == "ready" and r.get("ready_at"):
            up = now - r["ready_at"]
            m = r.get("metrics") or {}
            line += (f"  up {up / 60:.0f} min, {m.get('requests', 0):.0f} requests, "
                     f"{m.get('generation_tokens', 0) / max(up, 1):.1f} tok/s avg")
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
    return "\n".join(lines)


def my_runs() -> list[Path]:
    try:
        paths = dict.fromkeys(Path(p) for p in REGISTRY.read_text().split("\n") if p.strip())
    except OSError:
        return []
    return [p for p in paths if (p / "serve.json").exists()]


def status(run: str | None) -> str:
    if run:
        return describe(serve_root(run))
    runs = my_runs()
    if not runs:
        return "no serve runs of yours (start one with `hpc-infer serve model=... cluster=...`)"
    return "\n".join(describe(r) for r in runs)


def serve_root(path: str) -> Path:
    root = Path(path).expanduser().resolve()
    if not (root / "serve.json").exists():
        raise UserError(f"{path}: not a serve run directory (no serve.json)")
    return root


def stop(run: str, wait_s: float = 120.0) -> str:
    """Cancel the replicas' jobs, wait until the scheduler shows them gone, mark them stopped."""
    root = serve_root(run)
    from .fleet import router_job

    backend, ids = recorded_backend(RunDir(root))
    if not ids:
        return f"{root}: no jobs recorded"
    router = router_job(root)
    jobs = ids + ([router] if router else [])
    what = backend.cancel(jobs)
    backend.wait_ended(jobs, wait_s)
    left = _stop_servers(root)
    for i in range(len(ids)):
        mark_stopped(root, i, "hpc-infer serve stop")
    return (f"stopped {len(ids)} replica{'s' * (len(ids) != 1)}{' and the router' if router else ''} of {root} "
            f"({what})"
            + (f"; {left} server process{'es' * (left != 1)} outlived {'their replicas' if left != 1 else 'its replica'}"
               f" and {'were' if left != 1 else 'was'} stopped by PID" if left else ""))


def mark_stopped(root: Path, index: int, why: str) -> None:
    """After its job ended: a replica killed before it could write why (SIGKILL after
    Slurm's KillWait) is marked stopped; one that wrote stopped or failed keeps its own word."""
    path = root / STATE_DIR / f"{index}.json"
    try:
        f = json.loads(path.read_text())
    except (OSError, ValueError):
        f = {"replica": index}
    if f.get("state") not in ("stopped", "failed"):
        f.update(state="stopped", stopped_because=why, t=time.time())
        write_atomic(path, (json.dumps(f) + "\n").encode())


def _stop_servers(root: Path) -> int:
    """vLLM servers (and their replica processes) the state files name on this host that are
    still running after the scheduler ended their jobs: a replica killed by SIGKILL cannot
    stop its server itself. Each is checked by its start time, never found by name."""
    from ..host.procs import descendants, identify, stop_all

    host = socket.gethostname()
    left = []
    for path in sorted((root / STATE_DIR).glob("*.json")):
        try:
            f = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if f.get("host") != host:
            continue
        for pid, start in ((f.get("server_pid"), f.get("server_pid_start")), (f.get("pid"), f.get("pid_start"))):
            p = identify(int(pid), start) if pid and start else None
            if p:
                left += [p] + descendants(p.pid)
    stop_all(left, grace_s=30.0)
    return len(left)
