"""`hpc-infer serve model=... cluster=... [serve.replicas=N]`: OpenAI-compatible endpoints.

Resolves the model to a local path and checks the GPU layout exactly as `launch` does,
generates (or takes) an API key kept in the user's own 0600 file, submits ONE job array
of N replicas (`serve/replica.py`), then waits, per replica queued -> loading -> ready,
and prints the URLs, the key's location, an ssh tunnel line and an `openai` snippet.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import secrets as pysecrets
import socket
import stat
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from ..models.cache import resolve_model
from ..config import RunConfig, to_run_config
from ..errors import UserError
from ..cluster.container import worker_python
from ..log import say
from ..run.plan import worker_spec
from ..cluster.preflight import cpu_build_on_gpus, preflight
from ..rundir import RunDir, set_permissions, trust, write_atomic
from ..secrets import find_token
from ..cluster.submit import BACKENDS, recorded_backend
from .fleet import router_url, router_wanted, submit_replicas, submit_router, wait_router_follows
from .serverun import KEYS_DIR, REGISTRY, ServeRun
from .status import replica_states

TERMINAL_STATES = ("ready", "failed", "stopped", "ended")


def bind_address(rc) -> str:
    """Where a replica listens: this machine only for the local backends (clients are here),
    every interface on Slurm (clients run on other nodes and the login node). Every route
    but /health needs the run's key either way (serve/auth.py). serve.host overrides."""
    if rc.serve.host:
        return rc.serve.host
    return "0.0.0.0" if rc.cluster.backend == "slurm" else "127.0.0.1"


def api_key_file(rc: RunConfig, run_name: str) -> tuple[Path, bool]:
    """The key's file (the user's own, mode 0600): given, or generated once per serve run."""
    if rc.serve.api_key_file:
        path = Path(rc.serve.api_key_file).expanduser()
        if not path.is_file():
            raise UserError(
                f"serve.api_key_file: {path} does not exist; write your key there (chmod 600), or leave "
                f"serve.api_key_file unset to have one generated"
            )
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise UserError(
                f"serve.api_key_file: {path} is readable by others (mode "
                f"{oct(stat.S_IMODE(path.stat().st_mode))}); run `chmod 600 {path}`"
            )
        return path, False
    KEYS_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(KEYS_DIR, 0o700)
    path = KEYS_DIR / f"{run_name}.key"
    if path.exists():
        return path, False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pysecrets.token_urlsafe(32) + "\n")
    return path, True


def serve(rc: RunConfig) -> Path:
    c = rc.cluster
    if c.backend == "debug":
        raise UserError(
            "cluster=debug runs in this process; serve with cluster=local (this machine) or a Slurm cluster"
        )
    if c.nodes_per_task > 1 and c.backend != "slurm":
        raise UserError(
            f"cluster.nodes_per_task={c.nodes_per_task}: a replica across nodes needs a Slurm cluster "
            f"(cluster={c.name} is {c.backend}); serve on one node, or pick a Slurm cluster"
        )
    if rc.serve.replicas > 1 and c.backend == "local" and c.gpus_per_task:
        say("several local replicas share this machine's GPUs")
    BACKENDS[c.backend].check_reachable(c)
    token = find_token(c.token_file)
    model_path = resolve_model(rc.model, c, token)
    wrong_build = cpu_build_on_gpus(c)
    if wrong_build:
        raise UserError(wrong_build)
    for note in preflight(rc.model, c, model_path):
        say(note)
    with_router = router_wanted({"router": rc.serve.router}, rc.serve.replicas)
    if with_router:
        import importlib.util

        if importlib.util.find_spec("vllm_router") is None:
            raise UserError(
                "serve.router: vllm-router is not installed here (its wheel is for Linux x86_64 only); "
                "`pip install vllm-router==0.1.17`, or serve without it: serve.router=false"
            )
    run_name = rc.run_name or f"serve__{rc.model.name}"
    rc.run_name = run_name
    set_permissions(rc.permissions)
    root = rc.run_path
    run = RunDir(root)
    if (root / "serve.json").exists():  # served before under this name: ours to reuse, or refused
        old = ServeRun.open(root, "run_dir", trust.OWN)
        live = [r for r in replica_states(old) if r["state"] in ("ready", "loading", "queued", "restarting")]
        if live:
            raise UserError(
                f"{root} is already serving ({len(live)} replica(s) {live[0]['state']}): see "
                f"`hpc-infer serve status {root}`, stop it with `hpc-infer serve stop {root}`, or give "
                f"another run_name=..."
            )
        gone_router = old.router_job()
        if gone_router:  # the last serve's router (its replicas may have been killed without a word)
            backend = recorded_backend(run)[0]
            backend.cancel_one(gone_router)
            backend.wait_ended(
                [gone_router], 120
            )  # gone before its files are cleared: it writes router.json as it stops
        old.clear()
    elif os.path.lexists(root):
        trust.check(root, "run_dir", trust.OWN, fix="give a run_name of your own (run_name=...)")
    (root / "serve").mkdir(parents=True, exist_ok=True)
    run.logs.mkdir(parents=True, exist_ok=True)
    key_file, generated = api_key_file(rc, run_name)
    spec = worker_spec(rc, model_path)
    python = worker_python(rc, run, model_path)
    model = dict(
        spec["model"],
        chat_template_path=str(Path(rc.model.chat_template).resolve()) if rc.model.chat_template else None,
    )
    served = rc.serve.name or rc.model.hf_id or rc.model.name
    serve_spec = {
        "model": model,
        "served_name": served,
        "host": bind_address(rc),
        "port_min": rc.serve.port_min,
        "port_max": rc.serve.port_max,
        "idle_minutes": rc.serve.idle_minutes,
        "ready_timeout_s": rc.serve.ready_timeout_min * 60,
        "extra_args": list(rc.serve.extra_args),
        "max_restarts": rc.serve.max_restarts,
        "restart_backoff_s": rc.serve.restart_backoff_s,
        "env": dict(c.env),
        "key_file": str(key_file),
        "key_file_explicit": bool(rc.serve.api_key_file),
        "permissions": rc.permissions,
        "replicas": rc.serve.replicas,
        "cluster": c.name,
        "backend": c.backend,
        "created": time.time(),
        # what `serve scale` needs to submit more replicas (and the router) the same way
        "cluster_config": dataclasses.asdict(c),
        "python": python,
        "router": rc.serve.router,
        "router_policy": rc.serve.router_policy,
        "router_port": rc.serve.router_port,
        "router_cpus": rc.serve.router_cpus,
        "router_mem": rc.serve.router_mem,
    }
    write_atomic(root / "serve.json", (json.dumps(serve_spec, indent=1) + "\n").encode())
    REGISTRY.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(REGISTRY, "a") as f:
        f.write(f"{root}\n")
    srun = ServeRun(root)
    ids = submit_replicas(srun, c, python, rc.serve.replicas)
    say(
        f"submitted {rc.serve.replicas} {c.backend} replica{'s' * (rc.serve.replicas != 1)} of {served} "
        f"({model_path}): {ids[0]}{' ...' if len(ids) > 1 else ''}"
    )
    if with_router:
        say(f"submitted the router (vllm-router, policy {rc.serve.router_policy}): {submit_router(srun)}")
    if generated and sys.stderr.isatty():  # shown once, on a terminal only (never into a log file)
        say(f"API key (shown once; kept in {key_file}): {key_file.read_text().strip()}")
    if not rc.wait:
        say(f"not waiting; follow with `hpc-infer serve status {root}`")
        return root
    states = wait_ready(srun)
    ready = [s for s in states if s["state"] == "ready"]
    if not ready:
        why = "; ".join(
            f"replica {s['replica']}: {s['state']}" + (f" ({s['error']})" if s.get("error") else "") for s in states
        )
        raise UserError(f"no replica became ready: {why}. Logs: {root / 'serve'}/<replica>.log and {run.logs}")
    router = None
    if srun.router_job():
        key = key_file.read_text().strip()
        workers = wait_router_follows(srun, key, len(ready))
        router = router_url(srun, key)
        if router and workers is not None:
            say(f"router: {router} sends to {len(workers)} replica{'s' * (len(workers) != 1)}")
        else:
            say(f"the router is not answering (see {root / 'serve' / 'router.log'}); use the replicas' URLs")
    print(instructions(root, served, key_file, ready, router))
    return root


def wait_ready(run: ServeRun, poll_s: float = 2.0) -> list[dict]:
    """Per replica queued -> loading -> ready (or failed), one line per change."""
    seen: dict[int, str] = {}
    t0 = time.monotonic()
    while True:
        states = replica_states(run)
        for s in states:
            if seen.get(s["replica"]) != s["state"]:
                seen[s["replica"]] = s["state"]
                extra = f" at {s['url']}" if s["state"] == "ready" else (f": {s['error']}" if s.get("error") else "")
                say(f"replica {s['replica']}: {s['state']}{extra} ({time.monotonic() - t0:.0f}s)")
        if states and all(s["state"] in TERMINAL_STATES for s in states):
            return states
        time.sleep(poll_s)


def instructions(root: Path, served: str, key_file: Path, ready: list[dict], router: str | None = None) -> str:
    """What to paste: the router's URL first when there is one (one URL for all replicas)."""
    from urllib.parse import urlsplit

    url = router or ready[0]["url"]
    u = urlsplit(url)
    login = socket.getfqdn()
    lines = [f"one URL for all {len(ready)} replicas (vllm-router): {router}"] if router else []
    lines += [f"{len(ready)} replica{'s' * (len(ready) != 1)} of {served} ready:"]
    lines += [f"  {s['url']}" for s in ready]
    lines += [
        f"model name: {served}",
        f"API key: in {key_file} (mode 0600; it is never written to the run directory)",
        f"  export OPENAI_API_KEY=$(cat {key_file}) OPENAI_BASE_URL={url}",
        f"from your laptop: ssh -N -L 8000:{u.hostname}:{u.port} {getpass.getuser()}@{login}"
        f"   then use base_url http://localhost:8000/v1",
        "python:",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{url}", api_key=open("{key_file}").read().strip())',
        f'  print(client.chat.completions.create(model="{served}", '
        'messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)',
        f"status: hpc-infer serve status {root}     stop: hpc-infer serve stop {root}",
        f"live load: hpc-infer serve metrics {root}     more or fewer replicas: hpc-infer serve scale {root} N",
        f"batch through it: hpc-infer launch ... cluster.endpoint={root}",
    ]
    return "\n".join(lines)


def hydra_task(cfg: DictConfig) -> None:
    """The command's work on Hydra's composed config (cli.py runs it through entry.run_hydra)."""
    serve(to_run_config(cfg))
