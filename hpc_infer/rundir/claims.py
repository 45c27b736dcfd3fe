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

from .layout import RunDir
from .lease import age, server_now


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


OWNERLESS_GRACE_S = 30.0  # a claim file still empty: being written now (a death mid-write leaves it so)


def holder_alive(run: RunDir, owner: Owner, lease_s: float, now: float) -> bool | None:
    """Whether a claim's holder is alive, from its heartbeat: the same process (host and pid:
    a requeued task has its job's id but is another process) beating within the lease by
    the file server's clock. None when it has no heartbeat (the claim's own age decides)."""
    if owner.host == socket.gethostname() and owner.pid != os.getpid() and not pid_alive(owner.pid):
        return False
    found = read_beat(run.heartbeat_path(owner.worker_id), now)
    if found is None:
        return None
    beat, beat_age = found
    if (beat.get("host"), beat.get("pid")) != (owner.host, owner.pid):
        return False
    return beat.get("state") not in ("finished", "failed", "stopped", "run deleted") and beat_age <= lease_s


def _stale(run: RunDir, path: Path, lease_s: float, now: float) -> bool:
    """A claim is stale when its holder is gone: its heartbeat (one file a worker writes per
    beat; claims are never touched again, so holding 16 costs nothing more) is older than
    the lease, names another process, or says it ended; or, with no heartbeat, the claim
    itself is older than the lease."""
    a = age(path, now)
    if a is None:
        return False
    owner = read_owner(path)
    if owner is None:
        return a > OWNERLESS_GRACE_S
    alive = holder_alive(run, owner, lease_s, now)
    return a > lease_s if alive is None else not alive


def is_stale(run: RunDir, chunk_id: int, lease_s: float, now: float | None = None) -> bool:
    """Ages by the file server's clock (`now` from lease.server_now), never this node's."""
    return _stale(run, run.claim_path(chunk_id), lease_s, now if now is not None else server_now(run.claims))


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
        if not _stale(run, grave, lease_s, server_now(run.claims)):
            try:
                os.link(grave, path)  # give it back; fails only if yet another claim exists
            except FileExistsError:
                pass
            return False
    finally:
        os.unlink(grave)
    return try_claim(run, chunk_id, owner)


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
    now = server_now(run.claims)
    for chunk_id in sorted(run.claimed_chunks()):
        path = run.claim_path(chunk_id)
        owner = read_owner(path)
        dead = owner is not None and dead_workers is not None and owner.worker_id in dead_workers
        if dead or is_stale(run, chunk_id, lease_s, now) or chunk_id in done:
            try:
                os.unlink(path)
                dropped.append(chunk_id)
            except FileNotFoundError:
                pass
    return dropped


def live_claims(run: RunDir, lease_s: float) -> set[int]:
    """Chunks being worked on right now: claimed, not done, lease not run out, holder not dead."""
    now = server_now(run.claims)
    return {cid for cid in run.claimed_chunks() - run.done_chunks() if not is_stale(run, cid, lease_s, now)}


def live_holders(run: RunDir, lease_s: float) -> dict[int, str]:
    """Chunk -> the worker holding a live claim on it (its attempt is running, not a death)."""
    out = {}
    for cid in live_claims(run, lease_s):
        owner = read_owner(run.claim_path(cid))
        if owner:
            out[cid] = owner.worker_id
    return out


def backups_dir(run: RunDir) -> Path:
    """Backup markers, apart from the claims: a worker running a chunk looks here (a few names)
    to learn whether another copy of it may be published, never lists the claims for that."""
    return run.claims / "backups"


def backed_up(run: RunDir) -> set[int]:
    try:
        return {int(n) for n in os.listdir(backups_dir(run)) if n.isdigit()}
    except FileNotFoundError:
        return set()


def try_backup(run: RunDir, chunk_id: int, owner: Owner) -> bool:
    """Mark a backup copy of a chunk (O_EXCL: at most one backup per chunk, ever)."""
    folder = backups_dir(run)
    folder.mkdir(exist_ok=True)
    try:
        fd = os.open(folder / f"{chunk_id:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"worker": owner.worker_id, "host": owner.host, "pid": owner.pid, "t": time.time()}))
    return True


STRAGGLER = 0.75  # bench/balance.py simulates the same threshold
TAIL_SHARE = 1 / 6  # a straggler claims nothing once less than this share of the estimated work is unclaimed
PACE_SAMPLE = 8  # heartbeats read to estimate the median rate (not all: 1,000 workers poll this)
NAMES_TTL_S = 600.0  # the heartbeat folder is listed again after this long (new workers appear rarely)
_names: dict[str, tuple[float, list[str]]] = {}


def rate(beat: dict) -> float | None:
    """A worker's records finished per second over its recent window (the `recent` samples
    of its heartbeat, one clock: the worker's own), or None before it has two samples."""
    recent = beat.get("recent") or []
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    return None


def read_beat(path: Path, now: float) -> tuple[dict, float] | None:
    """(a heartbeat, its age by the file server's clock `now`), or None (gone, being replaced)."""
    try:
        with open(path, "rb") as f:
            beat = json.loads(f.read())
            mtime = os.fstat(f.fileno()).st_mtime
    except (OSError, ValueError):
        return None
    return (beat, now - mtime) if isinstance(beat, dict) else None


def live(beat: dict, beat_age: float, fresh_s: float) -> bool:
    """The worker is alive and working: its beat is fresh by the server's clock."""
    return beat.get("state") in ("loading", "running") and beat_age < fresh_s


@dataclass
class Pace:
    ratio: float  # this worker's rate / the median rate of the live workers sampled, at most 1
    others_running: bool  # a sampled other worker is live and not a straggler itself


def pace(run: RunDir, worker_id: str, fresh_s: float, rng: random.Random | None = None) -> Pace | None:
    """This worker's recent rate over the median recent rate of a sample of the *live*
    others (workers of earlier launches, finished or dead, never count), or None while
    that is unknown. Under STRAGGLER, the worker holds fewer sequences and leaves the last
    chunks to the others (worker.py); bench/balance.py simulates the same policy."""
    now = server_now(run.heartbeats)
    mine = read_beat(run.heartbeat_path(worker_id), now)
    own = rate(mine[0]) if mine else None
    if own is None:
        return None
    listed, names = _names.get(str(run.root), (0.0, []))
    if time.time() - listed > NAMES_TTL_S:
        try:
            names = [n for n in os.listdir(run.heartbeats) if n.endswith(".json") and n != f"{worker_id}.json"]
        except OSError:
            return None
        _names[str(run.root)] = (time.time(), names)
    rates = []
    for name in (rng or random).sample(names, min(PACE_SAMPLE, len(names))):
        found = read_beat(run.heartbeats / name, now)
        if found and live(found[0], found[1], fresh_s):
            r = rate(found[0])
            if r is not None and r > 0:
                rates.append(r)
    rates.sort()
    if not rates:
        return None
    median = rates[len(rates) // 2]
    return Pace(min(1.0, own / median), any(r >= STRAGGLER * median for r in rates))


def progress_by_chunk(beats: list[dict], rates: list[float]) -> dict[int, tuple[int, float]]:
    """(records finished so far, the holder's recent records per second) for each chunk in
    flight, from the holders' latest heartbeats; `rates` collects every worker's rate."""
    out: dict[int, tuple[int, float]] = {}
    for beat in beats:
        r = rate(beat) or 0.0
        rates.append(r)
        for cid, done in (beat.get("in_flight") or {}).items():
            if int(done) >= out.get(int(cid), (-1, 0.0))[0]:
                out[int(cid)] = (int(done), r)
    return out


BACKUP_SAMPLE = 32  # heartbeats read to pick a backup (not all: 1,000 idle workers look at the tail)


def backup_candidate(
    run: RunDir, sizes: dict[int, int], fresh_s: float, rng: random.Random | None = None
) -> int | None:
    """The chunk most likely to finish last: held by a live straggler, no backup yet, with the
    longest expected time left = records left / the holder's recent rate. Read from a sample
    of the live workers' heartbeats (each names the chunks it runs and how far it is), never a
    sweep of the claims or outputs: every idle worker asks this at the tail, so its cost must
    not grow with the run (a run of up to BACKUP_SAMPLE workers is read whole).
    bench/balance.py simulates this policy; ties go to the lower id."""
    now = server_now(run.heartbeats)
    try:
        names = [n for n in os.listdir(run.heartbeats) if n.endswith(".json")]
    except OSError:
        return None
    names = (rng or random).sample(names, min(BACKUP_SAMPLE, len(names)))
    beats = [b for b, a in filter(None, (read_beat(run.heartbeats / n, now) for n in names)) if live(b, a, fresh_s)]
    rates: list[float] = []
    progress = progress_by_chunk(beats, rates)
    held = set(progress) - backed_up(run)
    if not held:
        return None

    def time_left(c: int) -> float:
        done, r = progress.get(c, (0, 0.0))
        return (sizes.get(c, 0) - done) / max(r, 1e-3)

    # only a straggler's chunks: a holder under STRAGGLER x the median rate of the live workers
    # (a backup of a chunk a normal worker holds rarely wins and costs batch time)
    rates.sort()
    median = rates[len(rates) // 2] if rates else 0.0
    held = {c for c in held if progress.get(c, (0, 0.0))[1] < STRAGGLER * median}
    if not held:
        return None
    return max(sorted(held), key=time_left)


SWEEP_SAMPLE = 16  # claims an idle worker checks for staleness (a run's dead holders are few)


class Claimer:
    """Which chunk a worker tries next, with few file-system calls at any scale: first its
    own stripe (rank, rank + of, ...: chunks are ordered largest first, so the first `of`
    chunks go one to each worker with no contention and no listing), then the chunks a
    listing of claims/ and out/ shows free, in order, then stale claims. A listing is made
    when the last one's free chunks are used up, and always once more before saying that
    nothing is left."""

    def __init__(self, run: RunDir, n_chunks: int, owner: Owner, lease_s: float, rank: int = 0, of: int = 1):
        self.run, self.n, self.owner, self.lease_s = run, n_chunks, owner, lease_s
        self.stripe = list(range(rank % n_chunks, n_chunks, max(1, of))) if n_chunks else []
        # done or claimed by someone, as far as we know: a relaunch's workers start from one
        # listing of out/ (empty on a fresh run), never claim-and-release every done chunk
        self.taken: set[int] = set(run.output_files())
        self._free: list[int] = []
        self._claimed_not_done: list[int] = []
        self._listed = 0.0
        self.listings = 0

    def _list(self) -> None:
        self._listed = time.time()
        self.listings += 1
        # names only: an output that exists is taken (its trailer is checked once, when it is
        # claimed or merged); a damaged one is moved aside by the launcher before workers start
        claimed, done = self.run.claimed_chunks(), self.run.output_files()
        self.taken = claimed | done
        self._claimed_not_done = sorted(claimed - done)
        self._free = [c for c in range(self.n) if c not in self.taken]

    def _try(self, cid: int) -> bool:
        if try_claim(self.run, cid, self.owner):
            if not self.run.chunk_done(cid):
                return True
            release(self.run, cid, self.owner)
        self.taken.add(cid)
        return False

    def _from_free(self, skip) -> int | None:
        for cid in list(self._free):
            if cid in self.taken or skip(cid):
                continue
            self._free.remove(cid)
            if self._try(cid):
                return cid
        return None

    def next(self, skip=lambda cid: False) -> int | None:
        """Claim a chunk; never one `skip` says to leave for now (a suspect while others run)."""
        while self.stripe:
            cid = self.stripe[0]
            if cid in self.taken:
                self.stripe.pop(0)
                continue
            if skip(cid):
                break
            self.stripe.pop(0)
            if self._try(cid):
                return cid
        if not self._free:
            self._list()
        cid = self._from_free(skip)
        if cid is None and time.time() - self._listed > 0.2:  # that listing was not fresh: look again
            self._list()
            cid = self._from_free(skip)
        if cid is not None:
            return cid
        # stale claims: a random sample, not all of them (every idle worker looks once: a sweep
        # of every claim by every worker costs O(workers^2) calls on the metadata server); a
        # relaunch drops the rest (release_dead)
        now = server_now(self.run.claims)
        pool = self._claimed_not_done
        for cid in sorted(random.sample(pool, min(SWEEP_SAMPLE, len(pool)))):  # a small run: all, in order
            if (
                not skip(cid)  # (a look at its attempts: only for the sampled claims)
                and is_stale(self.run, cid, self.lease_s, now)
                and take_over(self.run, cid, self.owner, self.lease_s)
            ):
                if not self.run.chunk_done(cid):
                    return cid
                release(self.run, cid, self.owner)
        return None
