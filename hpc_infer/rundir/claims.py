"""Atomic chunk claims: how workers share the run without a coordinator.

A claim is a file created with O_CREAT|O_EXCL, so exactly one worker wins it, and never
touched again: its holder's heartbeat (beats.py) says whether it still holds it. A claim
whose holder is gone (its beat older than the lease, another process, ended, or no longer
listing the chunk; with no beat, the claim older than the lease) is stale and may be taken
over. Takeover is won by creating a marker named after the stale claim (one taker wins)
and replaces the claim in one rename, so its name is never empty. Claims only avoid wasted
work; exactly-once output comes from each chunk having a single output path written by
rename. Which chunk to claim is claimer.py's; the tail's backups are tail.py's. Standard
library only.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from .beats import read_beat
from .fsio import Dir, Stat
from .layout import RunDir
from .lease import fs_now, unlink_quiet
from .notices import post_freed


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


def read_owner(fs: Dir, name: str) -> Owner | None:
    try:
        d = json.loads(fs.read(name))
        return Owner(str(d["worker"]), str(d["host"]), int(d["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def try_claim(run: RunDir, chunk_id: int, owner: Owner) -> bool:
    return run.fs.create(run.claim_name(chunk_id), owner.to_bytes())


def pid_alive(pid: int) -> bool:
    """A process with this id exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNERLESS_GRACE_S = 30.0  # a claim file still empty: being written now (a death mid-write leaves it so)


def holder_alive(
    run: RunDir, owner: Owner, lease_s: float, now: float, claim: tuple[int, float] | None = None
) -> bool | None:
    """Whether a claim's holder is alive, from its heartbeat: the same process (host and pid:
    a requeued task has its job's id but is another process) beating within the lease by
    the file server's clock, and, for `claim` (its chunk id and mtime), still holding it
    (disowned). None when it has no heartbeat (the claim's own age decides)."""
    if owner.host == socket.gethostname() and owner.pid != os.getpid() and not pid_alive(owner.pid):
        return False
    found = read_beat(run.fs, run.heartbeat_name(owner.worker_id), now)
    if found is None:
        return None
    beat, beat_age = found
    if (beat.get("host"), beat.get("pid")) != (owner.host, owner.pid):
        return False
    if claim is not None and disowned(beat, beat_age, *claim, now, lease_s):
        return False
    return beat.get("state") not in ("finished", "failed", "stopped", "run deleted") and beat_age <= lease_s


def disowned(beat: dict, beat_age: float, chunk_id: int, made: float, now: float, lease_s: float) -> bool:
    """A live holder's beat, written more than half a lease after the claim was made (by the
    file server's clock), that does not list the chunk among those it holds: a claim left by
    a release that failed (release reads the owner first, and a read error leaves the claim;
    the protocol simulator, seed 301360: a suspect won and released again through an EIO).
    Its holder lives, so by the lease alone it never went stale and the run never finished.
    Half a lease: a beat is written moments after it is composed, so one that landed that
    late was composed after the claim was made; a wrong verdict would cost a second copy of
    the chunk (the first complete output wins), never a record."""
    return not holds(beat, chunk_id) and (now - beat_age) - made > lease_s / 2


def holds(beat: dict, chunk_id: int) -> bool:
    """The beat lists the chunk among those its worker holds (a beat with no list: it may)."""
    held = beat.get("held")
    return not isinstance(held, list) or chunk_id in held


def _stale(
    run: RunDir, name: str, lease_s: float, now: float, st: Stat | None = None, chunk_id: int | None = None
) -> bool:
    """A claim is stale when its holder is gone: its heartbeat (one file a worker writes per
    beat; claims are never touched again, so holding 16 costs nothing more) is older than
    the lease, names another process, says it ended or, for a chunk's claim (`chunk_id`),
    no longer lists it (disowned); or, with no heartbeat, the claim itself is older than
    the lease. `st`: the claim's stat when the caller has just read it."""
    st = st if st is not None else run.fs.stat(name)
    if st is None:
        return False
    a = now - st.mtime
    owner = read_owner(run.fs, name)
    if owner is None:
        return a > OWNERLESS_GRACE_S
    alive = holder_alive(run, owner, lease_s, now, None if chunk_id is None else (chunk_id, st.mtime))
    return a > lease_s if alive is None else not alive


def is_stale(run: RunDir, chunk_id: int, lease_s: float, now: float | None = None, st: Stat | None = None) -> bool:
    """Ages by the file server's clock (`now` from lease.fs_now), never this node's; `st`:
    the claim's stat when the caller has just read it."""
    now = now if now is not None else fs_now(run.fs, "claims")
    return _stale(run, run.claim_name(chunk_id), lease_s, now, st, chunk_id)


TAKEN = "claims/taken"  # takeover markers: one name per stale claim (its inode and mtime)


def take_over(run: RunDir, chunk_id: int, owner: Owner, lease_s: float) -> bool:
    """Take a stale claim: only the claim judged stale, and only one taker.

    The claim's name is never left empty (a plain claimer could create a claim in the gap,
    and a taker that then put a live claim back would find it taken: two holders; found by
    tests/test_claims.py's interleavings). Takers of one stale claim race to create a
    marker named after it (its inode and mtime: a claim is never touched after it is made,
    so the pair names that one file); the one who creates it checks that the claim is still
    that file and replaces it with its own in one rename. A marker whose taker died (its
    holder stale by the same rule as a claim's) is removed, and the next look tries again."""
    name = run.claim_name(chunk_id)
    st = run.fs.stat(name)
    now = fs_now(run.fs, "claims")
    if st is None or not _stale(run, name, lease_s, now, chunk_id=chunk_id):
        return False
    marker = f"{TAKEN}/{chunk_id:05d}-{st.ino}-{int(st.mtime * 1e9)}"
    run.fs.mkdir(TAKEN)
    if not run.fs.create(marker, owner.to_bytes()):
        if _stale(run, marker, lease_s, now):  # a taker that died between its marker and its rename
            unlink_quiet(run.fs, marker)
        return False
    try:
        there = run.fs.stat(name)
        if there is None or (there.ino, there.mtime) != (st.ino, st.mtime):
            return False  # gone, or already another claim
        run.fs.replace(name, owner.to_bytes())
        return True
    finally:
        unlink_quiet(run.fs, marker)


def release(run: RunDir, chunk_id: int, owner: Owner) -> None:
    """Remove our claim (not someone else's who took it over)."""
    name = run.claim_name(chunk_id)
    if read_owner(run.fs, name) == owner:
        try:
            run.fs.unlink(name)
        except FileNotFoundError:
            pass


def release_dead(run: RunDir, lease_s: float, dead_workers: set[str] | None = None) -> list[int]:
    """Drop stale claims and claims held by workers known to be dead (used on relaunch)."""
    dropped = []
    done = run.done_chunks()
    now = fs_now(run.fs, "claims")
    for chunk_id in sorted(run.claimed_chunks()):
        name = run.claim_name(chunk_id)
        owner = read_owner(run.fs, name)
        dead = owner is not None and dead_workers is not None and owner.worker_id in dead_workers
        if dead or is_stale(run, chunk_id, lease_s, now) or chunk_id in done:
            try:
                run.fs.unlink(name)
                dropped.append(chunk_id)
            except FileNotFoundError:
                pass
    if set(dropped) - done:
        post_freed(run)  # idle workers of an earlier launch, still alive, list again
    return dropped


def live_claims(run: RunDir, lease_s: float) -> set[int]:
    """Chunks being worked on right now: claimed, not done, lease not run out, holder not dead."""
    now = fs_now(run.fs, "claims")
    return {cid for cid in run.claimed_chunks() - run.done_chunks() if not is_stale(run, cid, lease_s, now)}


def live_holders(run: RunDir, lease_s: float) -> dict[int, str]:
    """Chunk -> the worker holding a live claim on it (its attempt is running, not a death)."""
    out = {}
    for cid in live_claims(run, lease_s):
        owner = read_owner(run.fs, run.claim_name(cid))
        if owner:
            out[cid] = owner.worker_id
    return out


def sample_size(most: int, workers: int, least: int) -> int:
    """A look's sample: `most` up to 256 workers, then shrinking with the run (at least `least`):
    every idle worker looks at the tail, so the run's total stays flat (bench/metadata_sim.py
    --balance: 16 claims and 32 heartbeats an idle worker were 1,100 calls a second in the
    last fifth of a 1,000-worker run)."""
    return most if workers <= 256 else max(least, most * 256 // workers)
