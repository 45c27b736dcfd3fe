"""One replica across several nodes: a Ray cluster inside the replica's own allocation.

Each array task of a multi-node replica spans `cluster.nodes_per_task` nodes; submitit
runs ServeTask once per node (one task per node). The first node starts the Ray head on
a free port, writes its address to serve/<i>.ray.json and waits until every node has
registered; the others join it and stay until the replica on the first node has
stopped or failed (its serve/<i>.json says so) or Slurm signals them. vLLM on the first
node then spans the nodes (`--distributed-executor-backend ray`, set by the planner).
Each node's Ray runs under host/ray_start.py (`python -m hpc_infer.host.ray_start`, this
interpreter: a job's PATH need not hold `ray`), as in the multi-node sbatch template: a
start that misses Ray's fixed 30-s registration on a loaded node is stopped whole and
started again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..host.ports import free_port
from ..host.procs import start_child, stop_child
from ..rundir import write_atomic

WAIT_S = 600.0


def node_rank() -> tuple[int, int]:
    """(this node's rank in the job, nodes in the job) from Slurm's environment."""
    return int(os.environ.get("SLURM_NODEID", "0")), int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))


def _ray_node(args: list[str], log_path: Path) -> subprocess.Popen:
    """This node's Ray (`ray start ARGS --block`, started again if a start fails, see
    host/ray_start.py), its output appended to `log_path`; it goes when we go."""
    command = [sys.executable, "-m", "hpc_infer.host.ray_start", *args, "--disable-usage-stats"]
    return start_child(command, dict(os.environ), log_path, own_group=True)


def _address_file(root: Path, index: int) -> Path:
    return root / "serve" / f"{index}.ray.json"


def registered(address: str) -> int:
    """Live nodes in the Ray cluster at `address` (0 when it does not answer)."""
    code = (
        "import ray, sys\nray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    p = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120)
    try:
        return int(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return 0


def start_head(root: Path, index: int, nodes: int, log_path: Path, spec: dict) -> tuple[subprocess.Popen, str]:
    """The Ray head on this node; returns once all `nodes` are registered (else raises)."""
    ip = socket.gethostbyname(socket.gethostname())
    port = free_port(spec.get("port_min", 20000), spec.get("port_max", 60000))
    address = f"{ip}:{port}"
    head = _ray_node(["--head", f"--node-ip-address={ip}", f"--port={port}"], log_path)
    write_atomic(_address_file(root, index), (json.dumps({"address": address, "nodes": nodes}) + "\n").encode())
    deadline, seen = time.monotonic() + WAIT_S, 0
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(
                f"the Ray head exited with {head.returncode} before the cluster formed (log: {log_path})"
            )
        seen = registered(address)
        if seen >= nodes:
            with open(log_path, "a") as log:
                log.write(f"ray: {seen} nodes registered at {address}\n")
            return head, address
        time.sleep(2)
    stop_child(head)
    raise RuntimeError(f"Ray did not form: {seen} of {nodes} nodes registered after {WAIT_S:.0f} s (log: {log_path})")


def join_and_wait(root: Path, index: int, log_path: Path) -> dict:
    """A further node: join the head's cluster and stay until the replica has ended."""
    state_path, stop = root / "serve" / f"{index}.json", {"why": None}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(why="SIGTERM"))
    deadline = time.monotonic() + WAIT_S
    while not _address_file(root, index).exists():
        if time.monotonic() > deadline or stop["why"]:
            return {"replica": index, "node_state": "head never came up"}
        time.sleep(1)
    address = json.loads(_address_file(root, index).read_text())["address"]
    worker = _ray_node([f"--address={address}"], log_path)
    try:
        while stop["why"] is None and worker.poll() is None:
            try:
                if json.loads(state_path.read_text()).get("state") in ("stopped", "failed"):
                    break
            except (OSError, ValueError):
                pass  # not written yet, or being replaced
            time.sleep(2)
    finally:
        stop_child(worker)
    return {"replica": index, "node_state": f"left the Ray cluster ({stop['why'] or 'the replica ended'})"}
