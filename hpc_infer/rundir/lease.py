"""Leases that hold on a shared file system: ages from the file server's clock, and a lock
that needs no `flock`.

Nodes' clocks differ (minutes, on a bad day), and a file's mtime is set by the file
server. So an age is never `time.time() - mtime`: it is the server's now minus the
mtime, where the server's now is the mtime of a file this process just touched in the
same folder (`server_now`; `utime(path, None)` asks an NFS server for its own time).

`Lock` is a lock file created with O_EXCL (atomic on NFSv3/v4, Lustre, GPFS, BeeGFS and
local disks, where `flock` may be missing, per client, or refused with ENOSYS), holding
its owner, refreshed by a thread while held, and taken over only once its lease ran out
by the server's clock (or its owner is a dead process on this host): renamed away first,
so one taker wins. Opened without following links. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

from . import faults

_PROBES: dict[str, Path] = {}


def server_now(folder: Path | str) -> float:
    """The file server's clock for `folder`: the mtime of this process's probe file there,
    touched now. Costs one utime and one stat."""
    folder = str(folder)
    probe = _PROBES.get(folder)
    if probe is None:
        probe = _PROBES[folder] = Path(folder) / f".clock-{socket.gethostname()}-{os.getpid()}"
    try:
        os.utime(probe, follow_symlinks=False)  # a link planted there is touched itself, never its target
    except FileNotFoundError:
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        except OSError:
            return time.time()  # a folder we cannot write: our own clock is all there is
    except OSError:
        return time.time()
    try:
        return os.stat(probe, follow_symlinks=False).st_mtime
    except OSError:
        return time.time()


def fs_now(fs, sub: str = "") -> float:
    """server_now through a run's pinned handle (rundir/fsio.py): the mtime of this client's
    probe file in folder `sub`, touched now."""
    probe = f"{sub}/.clock-{fs.tag}" if sub else f".clock-{fs.tag}"
    try:
        fs.touch(probe)
        st = fs.stat(probe)
    except OSError:
        st = None
    return st.mtime if st is not None else fs.client_now()


BEATS_PER_S = 100.0  # the whole run's heartbeats a second, at most (two namespace calls each)


def beat_interval(heartbeat_s: float, lease_s: float, workers: int) -> float:
    """The heartbeat interval a run uses: `cluster.heartbeat_s`, lengthened at scale so that
    all workers together beat at most BEATS_PER_S times a second (10 s up to 1,000 workers,
    100 s at 10,000: bench/metadata_sim.py), and never past a quarter of the lease (a claim
    stays live across four missed beats)."""
    return round(max(heartbeat_s, min(workers / BEATS_PER_S, lease_s / 4)), 3)


def forget_probe(folder: Path | str) -> None:
    probe = _PROBES.pop(str(folder), None)
    if probe is not None:
        try:
            probe.unlink()
        except OSError:
            pass


def age(path: Path | str, now: float) -> float | None:
    """Seconds since `path` was last written, by the server's clock `now`; None if gone. A
    link's own age, never its target's."""
    try:
        return now - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


def _dead_here(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lock:
    """`with Lock(path, lease_s):` one holder at a time across nodes, without flock."""

    def __init__(self, path: Path | str, lease_s: float = 120.0, poll_s: float = 0.5, on_wait=None):
        self.path, self.lease_s, self.poll_s, self.on_wait = Path(path), lease_s, poll_s, on_wait
        self.owner = _owner()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.owner))
        return True

    def _read(self, path: Path) -> dict:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                value = json.loads(f.read() or "{}")
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self) -> dict | None:
        """The lock's owner (its token) when the lock is stale, else None."""
        try:
            if not stat.S_ISREG(os.stat(self.path, follow_symlinks=False).st_mode):
                return {}  # a link (or anything else) is no lock this code made: taken over at once
        except FileNotFoundError:
            return None
        a = age(self.path, server_now(self.path.parent))
        if a is None:
            return None
        owner = self._read(self.path)
        stale = a > self.lease_s or (not owner and a > 5.0) or _dead_here(owner)
        return owner if stale else None

    def _take_over(self, judged: dict) -> bool:
        """Remove the lock that was judged stale, and only that one: renamed away first (one
        taker wins the rename), then read; a lock that is not the one judged (another taker
        got there first and made its own, fresh) is linked back and left to its holder."""
        grave = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, grave)  # one taker wins
        except FileNotFoundError:
            return False
        try:
            if self._read(grave).get("token") != judged.get("token"):
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass
                return False
        finally:
            os.unlink(grave)
        faults.point("lock_taken_over", self.path)
        return self._try()

    def acquire(self) -> None:
        said = False
        while not self._try():
            judged = self._stale()
            if judged is not None and self._take_over(judged):
                break
            if not said and self.on_wait:
                self.on_wait()
                said = True
            time.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()
        faults.point("locked", self.path)  # tests hold a holder here to prove the others wait

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                os.utime(self.path, follow_symlinks=False)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._read(self.path).get("token") == self.owner["token"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        forget_probe(self.path.parent)

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
