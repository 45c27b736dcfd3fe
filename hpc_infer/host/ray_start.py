"""One node's `ray start --block`, started again when an attempt exits before Ray says it
started. Run as `python -m hpc_infer.host.ray_start ARGS...` (ARGS: `ray start`'s own), by
a multi-node replica (serve/ray_nodes.py) and by the multi-node sbatch script, inside the
image where there is one: standard library (psutil, a vLLM dependency, once a start failed).

Ray gives a starting node a fixed 30 s to register with its GCS (`ray/_private/node.py`,
`raylet_start_wait_time_s`, not a setting); a loaded node can miss it, and `ray start`
exits with "The current node timed out during startup". Whether an attempt started is read
from Ray's own output ("Ray runtime started."), never from a clock of ours. Each attempt
leads a process group of its own, stopped whole before the next one (the GCS or raylet a
failed start began) and when this process is told to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from .procs import child_setup, stop_group

ATTEMPTS = 3
STARTED = "Ray runtime started."


def _copy(stream, said: list[bool]) -> None:
    """Copy a start's output to our stderr line by line (where `ray start`'s errors went
    before it ran under us: the sbatch script points at the job's .err); note when Ray says
    it started."""
    for raw in stream:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        if STARTED.encode() in raw:
            said.append(True)


def run(args: list[str], attempts: int = ATTEMPTS, command: list[str] | None = None) -> int:
    """`ray start ARGS --block` until one attempt says it started (then for as long as it
    runs), at most `attempts` times; its output and ours go to our stderr. Returns the last
    attempt's exit status (128 + the signal when we were told to stop). `command` stands in
    for `python -m ray.scripts.scripts start` (a test's failing start)."""
    told: list[int] = []
    child: subprocess.Popen | None = None

    def on_stop(sig: int, frame) -> None:
        told.append(sig)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # `ray start` stops its node on SIGTERM

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    rc = 1
    for attempt in range(1, attempts + 1):
        if told:
            break
        start = command or [sys.executable, "-m", "ray.scripts.scripts", "start"]
        child = subprocess.Popen(
            [*start, *args, "--block"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # "Ray runtime started." as it is said
            preexec_fn=child_setup(signal.SIGTERM, own_group=True),
        )
        if told:  # told to stop while it was being started
            os.killpg(child.pid, signal.SIGTERM)
        said: list[bool] = []
        copier = threading.Thread(target=_copy, args=(child.stdout, said), daemon=True)
        copier.start()
        rc = child.wait()
        left = stop_group(child.pid)  # what the attempt left running (a failed start's raylet)
        # Its output ends once every writer has gone: the group's members are (a process that
        # escaped the group could hold the pipe; the bound only keeps that from hanging us).
        copier.join(timeout=60)
        started = bool(said)
        if started or told:
            break
        print(
            f"ray_start: attempt {attempt} of {attempts} exited with {rc} before Ray said it started; "
            f"stopped {len(left)} process(es) it left" + ("; starting again" if attempt < attempts else "; giving up"),
            flush=True,
        )
    return 128 + told[0] if told else rc


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
