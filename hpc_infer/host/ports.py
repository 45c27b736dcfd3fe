"""Free ports on this node, probed at random so jobs starting together do not pick the same.

vLLM's internal ports (the distributed init of tensor/pipeline-parallel workers, its
ZMQ sockets) start at VLLM_PORT when it is set; several multi-GPU jobs on one node then
need ranges of their own. Standard library only (the worker's image has vLLM, not us).
"""

from __future__ import annotations

import os
import random
import socket
import time


def free_port(lo: int, hi: int, span: int = 1, tries: int = 200) -> int:
    """A port p in [lo, hi) with p..p+span-1 all free on this node right now (random, so jobs
    starting together on one node do not race for the same one)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(tries):
        p = rng.randrange(lo, hi - span)
        socks = []
        try:
            for q in range(p, p + span):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no free port in [{lo}, {hi}) on {socket.gethostname()}")


def port_free(port: int) -> bool:
    """Whether a server could bind this node's `port` right now: nothing listens there
    (SO_REUSEADDR, as uvicorn binds: the closed connections of a server that just died,
    left in TIME_WAIT, do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def own_vllm_ports(env: dict, span: int = 16) -> str | None:
    """Give this process its own VLLM_PORT range unless the user set one; returns it."""
    if env.get("VLLM_PORT"):
        return None
    env["VLLM_PORT"] = str(free_port(20000, 60000, span=span))
    return env["VLLM_PORT"]
