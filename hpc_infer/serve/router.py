"""One URL for a serve run: vLLM's router (`vllm-router`) in front of the ready replicas.

Runs as its own small CPU job next to the replicas' array (serve/launch.py submits it,
`serve stop` cancels it). This process

1. starts a key check on 127.0.0.1 (`KeyCheck`): vllm-router's `--api-key` is only the
   key it sends to the workers; with `api_key_validation_urls` it asks a URL whether a
   client's `Authorization` header is good before any route (admin routes
   `/add_worker`, `/remove_worker`, `/list_workers` and `/health` too) and caches a good
   answer. Our check answers 200 for the run's key, 401 for anything else;
2. binds the router's public port itself and holds it (serve/router_front.py): the proof
   (the run's HMAC over a nonce, this socket's port, "router" and the job id) is answered
   there, so clients (serve/fleet.py: router_url, the worker's HTTP engine) prove the
   router before the key goes to it, and everything else is relayed to vllm-router;
3. starts vllm-router in a child process on 127.0.0.1 (the key only in its environment,
   never on its command line) and sends nothing to it, the key included, before
   `listens` has seen the child itself hold that port;
4. every `SYNC_S` seconds compares the router's workers with the replicas that prove
   they are this run's (serve/auth.py: proves_ours; every vLLM answers `/health`, and the
   router sends the key to its workers) and are not being removed by `serve scale`, and
   adds or removes the difference; `serve/router.json` says where it is and which replicas it sends to;
5. ends with the serve run: on SIGTERM (`serve stop`, scancel, the time limit), or once
   every replica has stopped or failed for good.

Policy: round-robin (see docs/serve.md: replicas of one model are identical, batch
requests are independent, and round-robin measured on par with a client's own
round-robin; `serve.router_policy` picks another of vllm-router's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..host.ports import free_port
from ..host.procs import identify, scheduler_job_id, start_child, stop_child, this_process
from ..rundir import tail_lines, write_atomic
from ..host.http import bearer_matches, http, key_digest, proof, proves_ours
from .router_front import Front, bind_public, listens
from .serverun import ServeRun

SYNC_S = 2.0


class KeyCheck(ThreadingHTTPServer):
    """Answers 200 to `Authorization: Bearer <the run's key>`, 401 to anything else."""

    daemon_threads = True

    def __init__(self, key: str):
        digest = key_digest(key)

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                self.send_response(200 if bearer_matches(self.headers.get("Authorization") or "", digest) else 401)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args):  # never log requests (they carry keys)
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/check"


def router_workers(base: str, key: str) -> list[str] | None:
    code, text = http(f"{base}/list_workers", key=key)
    if code != 200:
        return None
    try:
        return list(json.loads(text).get("urls") or [])
    except ValueError:
        return None


def healthy_replicas(run: ServeRun, key: str) -> tuple[list[str], bool]:
    """(base URLs of the replicas that prove they are this run's and are not being removed,
    whether every replica has ended for good: stopped or failed in its own state file)."""
    urls, ended = [], True
    for i in run.indices():
        f = run.state(i)
        if not f:
            ended = False  # queued, not started yet
            continue
        if f.get("state") not in ("stopped", "failed"):
            ended = False
        base = (f.get("url") or "").removesuffix("/v1")
        if (
            base
            and not run.removing_marker(i).exists()
            and proves_ours(base, key, run.root, f.get("replica", i), f.get("job_id", ""))
        ):
            urls.append(base)
    return urls, ended


def child_main() -> None:
    """The router itself (a child of run_router): its settings and key from the environment."""
    from vllm_router.router import Router, policy_from_str

    conf = json.loads(os.environ.pop("HPC_INFER_ROUTER_CONF"))
    key = os.environ.pop("HPC_INFER_ROUTER_KEY")
    Router(
        worker_urls=[],
        policy=policy_from_str(conf["policy"]),
        host=conf["host"],
        port=conf["port"],
        api_key=key,
        api_key_validation_urls=[conf["check_url"]],
        log_level="warning",
        health_check_interval_secs=10,
        worker_startup_timeout_secs=30,
        worker_startup_check_interval=1,
    ).start()


def run_router(run_dir: str) -> dict:
    run = ServeRun(run_dir)
    spec = run.spec
    state_path, log_path = run.router_state_path, run.state_dir / "router.log"
    host = socket.gethostname()
    job_id = scheduler_job_id(fallback=str(os.getpid()))
    state = {
        "job_id": job_id,
        "host": host,
        "pid": os.getpid(),
        "pid_start": this_process().start,
        "state": "starting",
        "url": None,
        "workers": [],
        "policy": spec.get("router_policy", "round_robin"),
        "started": time.time(),
    }

    def save(**kw) -> None:
        state.update(kw, t=time.time())
        try:
            write_atomic(state_path, (json.dumps(state) + "\n").encode())
        except OSError:
            pass

    key = Path(spec["key_file"]).expanduser().read_text().strip()
    check = KeyCheck(key)
    threading.Thread(target=check.serve_forever, daemon=True).start()
    bind = spec.get("host", "0.0.0.0")
    try:
        public = _bind_public(bind, spec)
    except OSError as e:
        save(
            state="failed",
            error=f"serve.router_port={spec.get('router_port')}: {e.strerror}; pick a free port or leave it unset",
        )
        raise SystemExit(1)
    port = public.getsockname()[1]
    inner = free_port(spec.get("port_min", 20000), spec.get("port_max", 60000))
    addr = "127.0.0.1" if bind in ("127.0.0.1", "localhost") else host
    base = f"http://127.0.0.1:{port}" if addr == "127.0.0.1" else f"http://{addr}:{port}"
    inner_base = f"http://127.0.0.1:{inner}"  # vllm-router itself: only after listens() said it is our child's
    env = dict(
        os.environ,
        HPC_INFER_ROUTER_KEY=key,
        NO_COLOR="1",
        HPC_INFER_ROUTER_CONF=json.dumps(
            {"policy": state["policy"], "host": "127.0.0.1", "port": inner, "check_url": check.url}
        ),
    )
    stop = {"why": None}

    def on_term(signum, frame):
        stop["why"] = f"signal {signal.Signals(signum).name}"

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    child = start_child(
        [sys.executable, "-c", "from hpc_infer.serve.router import child_main; child_main()"], env, log_path
    )
    server = identify(child.pid)
    owned = {"inner": False}  # the child itself listens on `inner` (checked before the key goes there)
    run_dir = os.path.realpath(run.root)
    front = Front(
        public,
        lambda nonce, p: proof(key, nonce, run_dir, p, "router", job_id),
        inner,
        lambda: owned["inner"] and child.poll() is None,
    ).start()
    save(port=port, server_pid=child.pid, server_pid_start=server.start if server else None)
    try:
        while child.poll() is None and stop["why"] is None:
            owned["inner"] = owned["inner"] or listens(child.pid, inner)
            if owned["inner"] and router_workers(inner_base, key) is not None:
                break
            time.sleep(0.5)
        if child.poll() is not None:
            save(state="failed", error=f"the router exited with {child.returncode}", log_tail=tail_lines(log_path))
            raise SystemExit(1)
        save(state="ready", url=f"{base}/v1", ready_at=time.time())
        while stop["why"] is None and child.poll() is None:
            want, ended = healthy_replicas(run, key)
            have = router_workers(inner_base, key) if child.poll() is None else None
            if have is not None:
                for url in sorted(set(want) - set(have)):
                    http(f"{inner_base}/add_worker?url={url}", timeout=60, key=key, method="POST")
                for url in sorted(set(have) - set(want)):
                    http(f"{inner_base}/remove_worker?url={url}", timeout=60, key=key, method="POST")
                now = router_workers(inner_base, key)
                if now is not None and sorted(now) != state["workers"]:
                    save(workers=sorted(now))
            if ended:
                stop["why"] = "every replica has ended"
                break
            time.sleep(SYNC_S)
        if child.poll() is not None and stop["why"] is None:
            save(state="failed", error=f"the router exited with {child.returncode}", log_tail=tail_lines(log_path))
            raise SystemExit(1)
        save(state="stopped", stopped_because=stop["why"], workers=[])
        return state
    finally:
        front.stop()
        stop_child(child, grace_s=30)
        check.shutdown()


def _bind_public(bind: str, spec: dict):
    """The router's public socket, bound here and held: `serve.router_port` when set (taken:
    an error naming it), else a free port in the range, another one if it is taken between
    the probe and the bind."""
    if spec.get("router_port"):
        return bind_public(bind, int(spec["router_port"]))
    for _ in range(20):
        try:
            return bind_public(bind, free_port(spec.get("port_min", 20000), spec.get("port_max", 60000)))
        except OSError:
            continue
    return bind_public(bind, 0)
