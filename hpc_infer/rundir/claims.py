"""Atomic chunk claims: how workers share the run without a coordinator.

A claim is a file created with O_CREAT|O_EXCL, so exactly one worker wins it. Its
holder refreshes the file's mtime while working; a claim whose mtime is older than
the lease, or whose holder is a dead process on this host, is stale and may be taken
over. Takeover renames the stale file away first (rename is atomic: one taker wins),
then claims anew. Claims only avoid wasted work; exactly-once output comes from each
chunk having a single output path written by rename. Standard library only.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .files import read_json
from .layout import RunDir, read_heartbeats


@dataclass(frozen=True)
class Owner:
    worker_id: str
    host: str
    pid: int

    @staticmethod
    def current(worker_id: str) -> "Owner":
        return Owner(worker_id, socket.gethostname(), os.getpid())

    def to_bytes(self) -> bytes:
        return json.dumps({"worker": self.worker_id, "host": self.host, "pid": self.pid}).encode()


def read_owner(path: Path) -> Owner | None:
    try:
        d = json.loads(path.read_bytes())
        return Owner(str(d["worker"]), str(d["host"]), int(d["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def try_claim(run: RunDir, chunk_id: int, owner: Owner) -> bool:
    path = run.claim_path(chunk_id)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(owner.to_bytes())
    return True


def pid_alive(pid: int) -> bool:
    """A process with this id exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(st: os.stat_result, owner: Owner | None, lease_s: float, now: float) -> bool:
    age = now - st.st_mtime
    if age > lease_s:
        return True
    if owner is None:
        # Being written right now, or garbage: give the writer a moment.
        return age > 5.0
    return owner.host == socket.gethostname() and owner.pid != os.getpid() and not pid_alive(owner.pid)


def is_stale(path: Path, lease_s: float, now: float | None = None) -> bool:
    """A claim is stale when its lease ran out or its holder died on this host."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return _stale(st, read_owner(path), lease_s, now or time.time())


def take_over(run: RunDir, chunk_id: int, owner: Owner, lease_s: float) -> bool:
    """Take a stale claim. Only one of several concurrent takers succeeds.

    The claim is renamed away first (atomic: one renamer wins). If what we renamed
    turns out to be live (another taker's fresh claim), it is linked back.
    """
    path = run.claim_path(chunk_id)
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    try:
        if not _stale(grave.stat(), read_owner(grave), lease_s, time.time()):
            try:
                os.link(grave, path)  # give it back; fails only if yet another claim exists
            except FileExistsError:
                pass
            return False
    finally:
        os.unlink(grave)
    return try_claim(run, chunk_id, owner)


def refresh(run: RunDir, chunk_id: int) -> None:
    try:
        os.utime(run.claim_path(chunk_id))
    except FileNotFoundError:
        pass


def release(run: RunDir, chunk_id: int, owner: Owner) -> None:
    """Remove our claim (not someone else's who took it over)."""
    path = run.claim_path(chunk_id)
    if read_owner(path) == owner:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def release_dead(run: RunDir, lease_s: float, dead_workers: set[str] | None = None) -> list[int]:
    """Drop stale claims and claims held by workers known to be dead (used on relaunch)."""
    dropped = []
    done = run.done_chunks()
    for chunk_id in sorted(run.claimed_chunks()):
        path = run.claim_path(chunk_id)
        owner = read_owner(path)
        dead = owner is not None and dead_workers is not None and owner.worker_id in dead_workers
        if dead or is_stale(path, lease_s) or chunk_id in done:
            try:
                os.unlink(path)
                dropped.append(chunk_id)
            except FileNotFoundError:
                pass
    return dropped


def live_claims(run: RunDir, lease_s: float) -> set[int]:
    """Chunks being worked on right now: claimed, not done, lease not run out, holder not dead."""
    now = time.time()
    return {cid for cid in run.claimed_chunks() - run.done_chunks()
            if not is_stale(run.claim_path(cid), lease_s, now)}


def try_backup(run: RunDir, chunk_id: int, owner: Owner) -> bool:
    """Mark a backup copy of a chunk (O_EXCL: at most one backup per chunk, ever)."""
    try:
        fd = os.open(run.claims / f"{chunk_id:05d}.backup", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"worker": owner.worker_id, "host": owner.host, "pid": owner.pid, "t": time.time()}))
    return True


STRAGGLER = 0.75  # bench/balance.py simulates the same threshold
TAIL_SHARE = 1 / 6  # a straggler claims nothing once less than this share of the estimated work is unclaimed
PACE_SAMPLE = 32  # heartbeats read to estimate the median rate (not all: 1,000 workers poll this)


def beat_rate(beat: dict) -> float:
    """A worker's records per second since it started, from its heartbeat."""
    elapsed = max(float(beat.get("t", 0)) - float(beat.get("started", 0)), 1e-6)
    return (int(beat.get("records_done", 0)) + sum((beat.get("in_flight") or {}).values())) / elapsed


@dataclass
class Pace:
    ratio: float  # this worker's rate / the median rate, at most 1
    others_running: bool  # a sampled other worker is running now (its heartbeat is fresh)


def pace(run: RunDir, worker_id: str, fresh_s: float, rng: random.Random | None = None) -> Pace | None:
    """This worker's rate over the median rate of a sample of the others' heartbeats, or
    None while no sampled worker has finished a record yet. Under STRAGGLER, the worker
    holds fewer sequences and leaves the last chunks to the others (loop.py); the same
    policy is simulated in bench/balance.py."""
    try:
        names = [n for n in os.listdir(run.heartbeats) if n.endswith(".json") and n != f"{worker_id}.json"]
        own = beat_rate(read_json(run.heartbeat_path(worker_id)))
    except (OSError, ValueError):
        return None
    rates, running, now = [], False, time.time()
    for name in (rng or random).sample(names, min(PACE_SAMPLE, len(names))):
        try:
            beat = read_json(run.heartbeats / name)
        except (OSError, ValueError):
            continue  # being replaced right now
        if beat.get("records_done"):
            rates.append(beat_rate(beat))
        running = running or (beat.get("state") == "running" and now - float(beat.get("t", 0)) < fresh_s)
    rates.sort()
    if not rates or rates[len(rates) // 2] <= 0:
        return None
    return Pace(min(1.0, own / rates[len(rates) // 2]), running)


def progress_by_chunk(beats: list[dict], rates: list[float]) -> dict[int, tuple[int, float]]:
    """(records finished so far, the holder's records per second) for each chunk in flight,
    from the holders' latest heartbeats; `rates` collects every worker's rate."""
    out: dict[int, tuple[int, float]] = {}
    for beat in beats:
        rate = beat_rate(beat)
        if beat.get("records_done"):
            rates.append(rate)
        for cid, done in (beat.get("in_flight") or {}).items():
            if int(done) >= out.get(int(cid), (-1, 0.0))[0]:
                out[int(cid)] = (int(done), rate)
    return out


def backup_candidate(run: RunDir, sizes: dict[int, int], lease_s: float) -> int | None:
    """The chunk most likely to finish last: held by a live straggler, not done, no backup yet,
    with the longest expected time left = records left / the holder's rate (from the
    holders' heartbeats; bench/balance.py simulates this policy); ties go to the lower id."""
    backed = {int(n[:5]) for n in os.listdir(run.claims) if n.endswith(".backup") and n[:5].isdigit()}
    live = live_claims(run, lease_s) - backed
    if not live:
        return None
    rates: list[float] = []
    progress = progress_by_chunk(read_heartbeats(run), rates)

    def time_left(c: int) -> float:
        done, rate = progress.get(c, (0, 0.0))
        return (sizes.get(c, 0) - done) / max(rate, 1e-3)

    # only a straggler's chunks: a holder under STRAGGLER x the median rate of all workers
    # (a backup of a chunk a normal worker holds rarely wins and costs batch time)
    rates = sorted(rates or [r for _, r in progress.values()])
    median = rates[len(rates) // 2] if rates else 0.0
    live = {c for c in live if progress.get(c, (0, 0.0))[1] < STRAGGLER * median}
    if not live:
        return None
    return max(sorted(live), key=time_left)
