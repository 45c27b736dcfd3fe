"""Processes we start, identified so that we stop exactly them (stdlib; Linux /proc).

A process is known by (pid, start time): a pid alone can be reused once the process is
gone, the pair cannot. `cancel` and `serve stop` collect a run's processes (the job's
controller, everything under it, the workers its heartbeats name) before signalling
any of them, so a worker re-parented to init when its controller died is still found.
`die_with_parent` makes a child we start go when its parent goes, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Iterable, NamedTuple

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class Proc(NamedTuple):
    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22)


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has ended


def this_process() -> Proc:
    return Proc(os.getpid(), start_time(os.getpid()) or 0)


def identify(pid: int, start: int | None = None) -> Proc | None:
    """The running process `pid`, if it is (still) the one that started at `start`."""
    now = start_time(pid)
    if now is None or (start is not None and now != start):
        return None
    return Proc(pid, now)


def alive(p: Proc) -> bool:
    return start_time(p.pid) == p.start


def descendants(root: int) -> list[Proc]:
    """Every process under `root` now (children, grandchildren, ...), by one /proc scan."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        p = identify(pid)
        if p:
            out.append(p)
        todo += children.get(pid, [])
    return out


def signal_all(procs: Iterable[Proc], sig: int) -> None:
    for p in procs:
        if alive(p):
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def scheduler_job_id(fallback: str | None = None) -> str:
    """This process's job as the scheduler names it: a submitit local job, a Slurm array
    task (`JOB_TASK`), a Slurm job; else `fallback` (host-pid when not given). submitit's
    local id comes first: a local run started inside an allocation inherits its SLURM_*."""
    env = os.environ
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return env["SUBMITIT_LOCAL_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    return fallback if fallback is not None else f"{socket.gethostname()}-{os.getpid()}"


def child_setup(parent_death: int, own_group: bool = False):
    """What a child we start does before it runs (a `preexec_fn`): gets `parent_death` when
    we go, and with `own_group` leads a process group of its own (stop_group stops it whole)."""

    def setup() -> None:
        if own_group:
            os.setpgid(0, 0)
        die_with_parent(parent_death)

    return setup


def start_child(
    command: list[str], env: dict, log_path, parent_death: int = signal.SIGTERM, own_group: bool = False
) -> subprocess.Popen:
    """A child whose output is appended to `log_path`, that gets `parent_death` when we go,
    even by SIGKILL (a server left behind would keep answering with the run's key); with
    `own_group`, the leader of a process group of its own, which everything it starts joins
    (stop_group stops them all, wherever they were re-parented)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_setup(parent_death, own_group),
        )


def group_members(pgid: int) -> list:
    """The live processes of process group `pgid` (psutil.Process objects: each knows its
    start time, so a signal never reaches a pid reused meanwhile). A group's id is its
    leader's pid, which the kernel does not hand out again while any member lives: the
    members of a group we started are ours, even once the leader has gone."""
    import psutil  # a dependency of vLLM: imported here, so a batch worker needs only the stdlib

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def stop_group(pgid: int, grace_s: float = 15.0) -> list:
    """Stop what is left of a process group we started (a server's engine-core process after
    the server was SIGKILLed): SIGTERM, then SIGKILL after `grace_s`. Returns what was found."""
    import psutil

    left = group_members(pgid)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive_ = psutil.wait_procs(left, timeout=grace_s)
    for p in alive_:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive_, timeout=30)
    for p in left:  # reap the ones that were our children (a subreaper's orphans too)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p.pid, os.WNOHANG)
    return left


def stop_child(child: subprocess.Popen, grace_s: float = 60.0, told: bool = False) -> None:
    """SIGTERM a child we started (if it still runs; not again when `told`: a second SIGTERM
    makes uvicorn skip its graceful shutdown), SIGKILL it after `grace_s`, reap it."""
    if not told and child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def stop_all(procs: list[Proc], grace_s: float = 15.0, first: int = signal.SIGTERM) -> list[Proc]:
    """Signal `first`, wait until they are gone or `grace_s` passed, SIGKILL what is left and
    wait for it to go. Returns the processes that needed SIGKILL. The outcome (all gone)
    does not depend on how fast they react; only how long it takes does."""
    signal_all(procs, first)
    deadline = time.monotonic() + grace_s
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    signal_all(left, signal.SIGKILL)
    for _ in range(600):  # SIGKILL always lands; a process in uninterruptible sleep takes a moment
        if not [p for p in left if alive(p)]:
            break
        time.sleep(0.05)
    return left


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent ends (PR_SET_PDEATHSIG).
    Used in a child right after it starts (preexec_fn, or a worker under its controller).
    If the parent already ended before the call, exit now. False where unsupported."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it ended between our look and the call
        os.kill(os.getpid(), sig)
    return True


def become_subreaper() -> bool:
    """Have orphaned descendants re-parented to this process instead of init
    (PR_SET_CHILD_SUBREAPER): when a child we started is killed outright, what it started
    (vLLM's engine-core process under its server) stays ours to find and stop."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_orphans(keep: Iterable[int] = (), grace_s: float = 10.0) -> list[Proc]:
    """Stop every process under this one except `keep` and what runs under those (a
    subreaper's orphans, once the child that started them has ended), and reap them.
    Returns what was stopped."""
    kept = set(keep)
    for pid in list(kept):
        kept.update(p.pid for p in descendants(pid))
    left = [p for p in descendants(os.getpid()) if p.pid not in kept]
    stop_all(left, grace_s=grace_s)
    for p in left:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return left
