"""Leases that hold on a shared file system: ages from the file server's clock, and a lock
that needs no `flock`.

Nodes' clocks differ (minutes, on a bad day), and a file's mtime is set by the file
server. So an age is never `time.time() - mtime`: it is the server's now minus the
mtime, where the server's now is the mtime of a file this process just touched in the
same folder (`fs_now`; `utime(path, None)` asks an NFS server for its own time).

`Lock` is a lock file created with O_EXCL (atomic on NFSv3/v4, Lustre, GPFS, BeeGFS and
local disks, where `flock` may be missing, per client, or refused with ENOSYS), holding
its owner, refreshed by a thread while held, and taken over only once its lease ran out
by the server's clock (or its owner is a dead process on this host): one taker wins a
marker named after the stale lock and replaces it in one rename. Every step goes through
a handle on the folder (rundir/fsio.Dir), without following links. Standard library only.
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


_OFFSETS: dict[str, float] = {}  # a client's tag -> the server's clock minus its node's, at its last probe
PROBE_TRIES = 3


def fs_now(fs, sub: str = "") -> float:
    """The file server's clock, through a pinned handle (rundir/fsio.py): the mtime of this
    client's probe file in folder `sub`, touched now (one utime and one stat).

    A probe that fails (EIO) is tried again; when every try fails, the server's clock is
    this node's plus the offset the last probe saw. The node's own clock is used only when
    no probe ever answered: it was the fallback for any failure, and on a node minutes
    ahead a worker then judged its own claim stale, took it over and ran the chunk twice
    (the protocol simulator, seed 333: a run that never finished)."""
    probe = f"{sub}/.clock-{fs.tag}" if sub else f".clock-{fs.tag}"
    for _ in range(PROBE_TRIES):
        try:
            fs.touch(probe)
            st = fs.stat(probe)
        except OSError:
            continue
        if st is not None:
            _OFFSETS[fs.tag] = st.mtime - fs.client_now()
            return st.mtime
    return fs.client_now() + _OFFSETS.get(fs.tag, 0.0)


BEATS_PER_S = 50.0  # the whole run's heartbeats a second, at most (two namespace calls each)


def beat_interval(heartbeat_s: float, lease_s: float, workers: int) -> float:
    """The heartbeat interval a run uses: `cluster.heartbeat_s`, lengthened at scale so that
    all workers together beat at most BEATS_PER_S times a second (10 s up to 500 workers, 20 s
    at 1,000, 150 s at 10,000 with the default lease: bench/metadata_sim.py), and never past
    a quarter of the lease (a claim stays live across four missed beats)."""
    return round(max(heartbeat_s, min(workers / BEATS_PER_S, lease_s / 4)), 3)


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
    """`with Lock(path, lease_s):` one holder at a time across nodes, without flock. Every
    step goes through a handle on the lock's folder (rundir/fsio.Dir: `fs`, or one opened
    on the folder), by name, never following a link."""

    def __init__(self, path: Path | str, lease_s: float = 120.0, poll_s: float = 0.5, on_wait=None, fs=None):
        self.path, self.lease_s, self.poll_s, self.on_wait = Path(path), lease_s, poll_s, on_wait
        self.name = self.path.name
        self.owner = _owner()
        self._given, self._fs = fs, fs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fs(self):
        if self._fs is None:
            from .fsio import PinnedDir

            self._fs = PinnedDir(self.path.parent)
        return self._fs

    def _mine(self) -> bytes:
        return json.dumps(self.owner).encode()

    def _try(self) -> bool:
        return self.fs.create(self.name, self._mine())

    def _read(self, name: str) -> dict:
        try:
            value = json.loads(self.fs.read(name) or b"{}")
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self) -> dict | None:
        """The lock's owner (its token) when the lock is stale, else None."""
        st = self.fs.stat(self.name)
        if st is None:
            return None
        if not stat.S_ISREG(st.mode):
            return {"ino": st.ino}  # a link (or anything else) is no lock this code made: taken over at once
        try:  # its age and its owner from one open file: never an old lock's age with a new one's owner
            raw, st = self.fs.read_stat(self.name)
            owner = json.loads(raw or b"{}")
            owner = owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = {}
        a = fs_now(self.fs) - st.mtime
        stale = a > self.lease_s or (not owner and a > 5.0) or _dead_here(owner)
        if not stale:
            return None
        return owner if owner.get("token") else {"ino": st.ino}

    def _take_over(self, judged: dict) -> bool:
        """Replace the lock that was judged stale, and only that one, never leaving its name
        empty (a plain taker could make a lock in the gap, and two would hold it: found by
        tests/test_claims.py's interleavings). Takers of one stale lock race to create a
        marker named after it (its token, or its inode when it has none); the one who makes
        it checks the lock is still the judged one and replaces it with its own in one
        rename. A marker older than the lease (its taker died) is removed."""
        ident = judged.get("token") or f"ino{judged.get('ino')}"
        marker = f"{self.name}.taking-{ident}"
        if not self.fs.create(marker, self._mine()):
            st = self.fs.stat(marker)
            if st is not None and fs_now(self.fs) - st.mtime > self.lease_s:
                unlink_quiet(self.fs, marker)
            return False
        try:
            st = self.fs.stat(self.name)
            if st is None:
                return False
            now = self._read(self.name) if stat.S_ISREG(st.mode) else {}
            same = now.get("token") == judged["token"] if judged.get("token") else st.ino == judged.get("ino")
            if not same:
                return False
            self.fs.replace(self.name, self._mine())
        finally:
            unlink_quiet(self.fs, marker)
        faults.point("lock_taken_over", self.path)
        return True

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
                if self._read(self.name).get("token") == self.owner["token"]:
                    self.fs.touch(self.name)  # never through a link (fsio: utime without following)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if self._read(self.name).get("token") == self.owner["token"]:
                unlink_quiet(self.fs, self.name)
            unlink_quiet(self.fs, f".clock-{self.fs.tag}")  # fs_now's probe: leave the folder as found
        finally:
            if self._given is None and self._fs is not None:
                self._fs.close()
                self._fs = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def unlink_quiet(fs, name: str) -> None:
    """Remove `name` from the handle `fs`; already gone is fine (claims and locks)."""
    try:
        fs.unlink(name)
    except FileNotFoundError:
        pass
