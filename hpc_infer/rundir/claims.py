"""Atomic chunk claims: how workers share the run without a coordinator.

A claim is a file created with O_CREAT|O_EXCL, so exactly one worker wins it. Its
holder refreshes the file's mtime while working; a claim whose mtime is older than
the lease, or whose holder is a dead process on this host, is stale and may be taken
over. Takeover is won by creating a marker named after the stale claim (one taker wins)
and replaces the claim in one rename, so its name is never empty. Claims only avoid wasted work; exactly-once output comes from each
chunk having a single output path written by rename. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
from dataclasses import dataclass

from . import clock, schema
from .fsio import Dir, Stat
from .layout import RunDir, chunk_id_of
from .lease import fs_now, unlink_quiet


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


def is_stale(run: RunDir, chunk_id: int, lease_s: float, now: float | None = None) -> bool:
    """Ages by the file server's clock (`now` from lease.fs_now), never this node's."""
    now = now if now is not None else fs_now(run.fs, "claims")
    return _stale(run, run.claim_name(chunk_id), lease_s, now, chunk_id=chunk_id)


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


BACKUPS = "claims/backups"  # backup markers, apart from the claims: a worker running a chunk
# looks here (a few names) to learn whether another copy of it may be published


def backed_up(run: RunDir) -> set[int]:
    return {cid for cid in map(chunk_id_of, run.fs.listdir(BACKUPS)) if cid is not None}


def try_backup(run: RunDir, chunk_id: int, owner: Owner) -> bool:
    """Mark a backup copy of a chunk (O_EXCL: at most one backup per chunk, ever)."""
    run.fs.mkdir(BACKUPS)
    marker = {"worker": owner.worker_id, "host": owner.host, "pid": owner.pid, "t": clock.now()}
    return run.fs.create(f"{BACKUPS}/{chunk_id:05d}", json.dumps(marker).encode())


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


def read_beat(fs: Dir, name: str, now: float) -> tuple[dict, float] | None:
    """(a heartbeat, its age by the file server's clock `now`), or None (gone, being replaced)."""
    try:
        data, st = fs.read_stat(name)
        beat = json.loads(data)
    except (OSError, ValueError):
        return None
    if schema.problems(beat, schema.HEARTBEAT):  # wrong types: read as no heartbeat (rundir/schema.py)
        return None
    return beat, now - st.mtime


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
    now = fs_now(run.fs, "heartbeats")
    mine = read_beat(run.fs, run.heartbeat_name(worker_id), now)
    own = rate(mine[0]) if mine else None
    if own is None:
        return None
    key = f"{run.fs.path}|{worker_id}"
    listed, names = _names.get(key, (0.0, []))
    if clock.now() - listed > NAMES_TTL_S:
        try:
            names = [n for n in run.fs.listdir("heartbeats") if n.endswith(".json") and n != f"{worker_id}.json"]
        except OSError:
            return None
        _names[key] = (clock.now(), names)
    rates = []
    for name in (rng or clock.rng()).sample(names, min(PACE_SAMPLE, len(names))):
        found = read_beat(run.fs, f"heartbeats/{name}", now)
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


def sample_size(most: int, workers: int, least: int) -> int:
    """A look's sample: `most` up to 256 workers, then shrinking with the run (at least `least`):
    every idle worker looks at the tail, so the run's total stays flat (bench/metadata_sim.py
    --balance: 16 claims and 32 heartbeats an idle worker were 1,100 calls a second in the
    last fifth of a 1,000-worker run)."""
    return most if workers <= 256 else max(least, most * 256 // workers)


def backup_candidate(
    run: RunDir, sizes: dict[int, int], fresh_s: float, rng: random.Random | None = None
) -> int | None:
    """The chunk most likely to finish last: held by a live straggler, no backup yet, with the
    longest expected time left = records left / the holder's recent rate. Read from a sample
    of the live workers' heartbeats (each names the chunks it runs and how far it is), never a
    sweep of the claims or outputs: every idle worker asks this at the tail, so its cost must
    not grow with the run (a run of up to BACKUP_SAMPLE workers is read whole).
    bench/balance.py simulates this policy; ties go to the lower id."""
    now = fs_now(run.fs, "heartbeats")
    names = [n for n in run.fs.listdir("heartbeats") if n.endswith(".json")]
    names = (rng or clock.rng()).sample(names, min(sample_size(BACKUP_SAMPLE, len(names), 8), len(names)))
    beats = [
        b for b, a in filter(None, (read_beat(run.fs, f"heartbeats/{n}", now) for n in names)) if live(b, a, fresh_s)
    ]
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


LIST_FRESH_S = 0.2  # a listing older than this is made again before its free chunks are tried
FREE_KEEP = 64  # free chunks kept from a listing (tried in order within LIST_FRESH_S)
POOL_KEEP = 512  # claims not done kept from a listing, to sample for staleness while idle

NOTICES = "claims/notices"  # what an idle worker reads instead of listing the run: `done` (every
# chunk has its output) and `freed-*` (a claim was released with its chunk unfinished)
DONE_NOTICE = f"{NOTICES}/done"
SHARED_LISTING = f"{NOTICES}/listing"  # the last listing a worker made, for the others (Claimer._list)
SHARED_FREE = 64  # free chunks a shared listing names (the first ones: the largest)
SHARED_TRIES = 8  # of its free chunks a worker tries (at random), and of its claims a publisher checks
FS_CACHE_S = 60.0  # the longest a file server's client may hide a new file (NFS's acregmax and acdirmax default)


def _in_notices(run: RunDir, write) -> None:
    """Write into claims/notices/, the folder made on first use (no notice yet, or a run
    planned before notices)."""
    try:
        write()
    except FileNotFoundError:
        run.fs.mkdir(NOTICES)
        write()


def _post(run: RunDir, name: str) -> None:
    _in_notices(run, lambda: run.fs.create(name, b""))


def post_freed(run: RunDir) -> None:
    """Say that a claim was released with its chunk unfinished (a stop, a dead engine, a
    suspect left for later, a relaunch dropping dead holders' claims): idle workers list again."""
    _post(run, f"{NOTICES}/freed-{clock.token(6)}")


def post_done(run: RunDir) -> None:
    """Say that a listing found every chunk's output: idle workers end without listing."""
    _post(run, DONE_NOTICE)


def done_posted(run: RunDir) -> bool:
    """A `done` notice is there (one stat; a file-server error reads as not yet)."""
    try:
        return run.fs.exists(DONE_NOTICE)
    except OSError:
        return False


def clear_notices(run: RunDir) -> None:
    """Before workers are submitted for what is left (launch.py): a `done` from an earlier
    launch must not end them (outputs set aside as damaged since are work again), and the
    earlier launch's `freed-*` notices go (the new workers list the run when they start, so
    none is needed; without this the folder every idle look lists would only grow)."""
    for name in run.fs.listdir(NOTICES):  # [] for a run planned before notices
        if name in ("done", "listing") or name.startswith("freed-"):
            unlink_quiet(run.fs, f"{NOTICES}/{name}")


@dataclass(frozen=True)
class SharedListing:
    """claims/notices/listing: what one worker's listing of claims/ and out/ found, for the
    others to use instead of listing again (Claimer._use_shared)."""

    token: str  # which listing: a worker uses each one once
    n_chunks: int
    freed: list[str]  # the `freed-*` notices there when it was made (it covers their releases)
    free: list[int]  # the first SHARED_FREE chunks neither claimed nor done
    more_free: bool  # more were free than it names
    pool: list[int]  # claims not done (a sample of POOL_KEEP), to watch for staleness
    all_done: bool  # every chunk had its output

    @staticmethod
    def parse(data: bytes, n_chunks: int) -> "SharedListing | None":
        """None for anything but a listing of this run's chunks in the shape we write (a
        damaged or foreign file is only a saving lost: the reader lists for itself)."""
        try:
            value = json.loads(data)
        except ValueError:
            return None
        if schema.problems(value, schema.SHARED_LISTING) or value["n_chunks"] != n_chunks:
            return None
        if not all(0 <= c < n_chunks for c in (*value["free"], *value["pool"])):
            return None
        return SharedListing(**value)


def stripe(rank: int, of: int, n_chunks: int) -> list[int]:
    """The chunks worker `rank` of `of` tries first, one from each round of `of` chunks, its
    place in the round reversed every other round (rank, 2 x of - 1 - rank, 2 x of + rank,
    ...), so every stripe holds about the same work. Chunks shrink along the plan; with the
    same place in every round (rank, rank + of, ...) rank 0's stripe held 28% more records
    than the mean and the last rank's 23% less (64 workers, the default plan; now +10% and
    -6%), the heavy stripes' big chunks were claimed late, by their owners or by workers
    whose stripes ran out, and the run's end waited on them: balance 0.964 at 64 workers,
    0.974 now (bench/metadata_sim.py --balance, docs/decisions.md). More workers than
    chunks: rank % n_chunks each."""
    of = max(1, of)
    if of >= n_chunks:
        return [rank % n_chunks] if n_chunks else []
    r = rank % of
    picks = (base + (r if k % 2 == 0 else of - 1 - r) for k, base in enumerate(range(0, n_chunks, of)))
    return [c for c in picks if c < n_chunks]  # the last round may be short


class Claimer:
    """Which chunk a worker tries next, with few file-system calls at any scale: first its
    own stripe (`stripe`: one chunk from each round of `of`; chunks are ordered largest
    first, so the first `of` chunks go one to each worker with no contention and no
    listing), then the chunks a fresh listing of claims/ and out/ shows free, in order,
    then stale claims.

    A listing is used only while fresh (LIST_FRESH_S): a worker claims every few tens of
    seconds, and by then the others have taken the free chunks it listed, each one a failed
    create (bench/metadata_sim.py --balance measured 3,000 of them a second at 1,000
    workers with a kept listing). Whether a chunk is a suspect to leave for later is asked
    only of a chunk this worker won (a suspect is released again), never of each candidate:
    that look reads the chunk's attempts, four calls.

    An idle worker does not list the run at each look: a listing of claims/ and out/ costs
    one call per 1,000 names, and at the tail every worker is idle (10,000 workers listing
    100,000 names every beat were 10,000 calls a second). Once a listing shows nothing free
    (`quiet`), a look reads claims/notices/ (one call: `done`, or a `freed-*` newer than
    the listing) and samples the claims not done that the listing showed for staleness. It
    lists again after a notice, after publishing a chunk itself (the last publisher's
    listing finds the run done and posts `done`), and when every claim it kept is gone.

    A worker that lists shares what it found (claims/notices/listing: the first free chunks,
    a sample of the claims not done, the notices it covers), and a worker about to list uses
    that instead when it has not used it yet (_use_shared): one read, not a listing of two
    folders of the run's size. Workers whose stripes are used up looked for work 3.4 times
    each over a run, so their own listings grew as workers²; shared, 0.04 to 0.05 a worker
    are made at 1,000 and 3,000 workers (bench/metadata_sim.py --balance).
    The memory kept is the stripe and at most FREE_KEEP + POOL_KEEP ids, never a set of the
    run's chunks (the simulator holds 10,000 workers in one process)."""

    def __init__(self, run: RunDir, n_chunks: int, owner: Owner, lease_s: float, rank: int = 0, of: int = 1):
        self.run, self.n, self.owner, self.lease_s = run, n_chunks, owner, lease_s
        # done as far as we know: a relaunch's workers start from one listing of out/ (empty
        # on a fresh run), never claim-and-release every done chunk
        done = run.output_files()
        self.stripe = [c for c in stripe(rank, of, n_chunks) if c not in done]
        self.sample = sample_size(SWEEP_SAMPLE, of, 4)  # claims a look checks for staleness
        self._free: list[int] = []  # the first FREE_KEEP free chunks of the last listing
        self._more_free = False  # the listing showed more free chunks than were kept
        self._pool: list[int] = []  # claims not done at the last listing (a sample of POOL_KEEP)
        self._listed = float("-inf")
        self._quiet = False  # a listing showed nothing free: look at notices, not the run
        self._notices: set[str] = set()  # the notices seen at the last idle look or listing
        self._expiry_due = 0.0  # idle_wait: when the sampled claims are read again
        self._all_done = False  # the last listing showed every chunk's output
        self._used = ""  # the token of the shared listing this worker used last
        self._shared = False  # the last listing was a shared one
        self._published = False  # this worker published a chunk since its last listing
        self._published_at = float("-inf")
        self._watch: list[int] = []  # chunks whose outputs a publisher's look missed (_rewatch)
        self.listings = 0  # listings of the run this worker made
        self.shared_used = 0  # shared listings it used instead

    def _list(self, notices: set[str] | None = None) -> None:
        """`notices`: claims/notices/ as this look already read it (idle_wait), else read here."""
        self._listed = clock.now()
        self._quiet = False
        self._expiry_due = 0.0  # a new pool: its holders are read at the next idle look
        # the notices first: a listing, this worker's or a shared one, must cover every release
        # they announce to be used
        self._notices = set(self.run.fs.listdir(NOTICES)) if notices is None else notices
        freed = sorted(n for n in self._notices if n.startswith("freed-"))
        published, self._watch = self._published, []
        self._shared = self._use_shared(freed)
        self._published = False
        if self._shared:
            return
        self.listings += 1
        # names only: an output that exists is taken (its trailer is checked once, when it is
        # claimed or merged); a damaged one is moved aside by the launcher before workers start
        claimed, done = self.run.claimed_chunks(), self.run.output_files()
        taken = claimed | done
        self.stripe = [c for c in self.stripe if c not in taken]
        free = (c for c in range(self.n) if c not in taken)
        first = [c for c, _ in zip(free, range(max(FREE_KEEP, SHARED_FREE)))]
        self._free = first[:FREE_KEEP]
        self._more_free = self.n - len(taken) > len(self._free)
        pool = claimed - done
        self._pool = sorted(pool if len(pool) <= POOL_KEEP else clock.rng().sample(sorted(pool), POOL_KEEP))
        self._all_done = len(done) >= self.n  # names only, as above: every chunk has its output
        if published and not self._all_done:
            self._watch = clock.rng().sample(self._pool, min(SHARED_TRIES, len(self._pool)))
        self._used = clock.token(8)
        shared = SharedListing(
            self._used,
            self.n,
            freed,
            first[:SHARED_FREE],
            self.n - len(taken) > SHARED_FREE,
            self._pool,
            self._all_done,
        )
        data = json.dumps(dataclasses.asdict(shared)).encode()
        try:
            _in_notices(self.run, lambda: self.run.fs.replace(SHARED_LISTING, data))
        except OSError:
            pass  # only a saving for the others: they list for themselves

    def _use_shared(self, freed: list[str]) -> bool:
        """Use the last listing another worker shared instead of listing claims/ and out/ (one
        call per 1,000 names): when this worker has not used that one yet and it was made after
        every `freed-*` notice there now. Every worker whose stripe is used up looks for work
        2 to 4 times a run, so listings of its own were 0.068 x workers² calls a run
        (bench/metadata_sim.py --balance: readdir 558/s at 3,000 workers).

        An old one is safe: a chunk becomes free again only by a release, which posts a
        `freed-*` notice, so the chunks free now are among those it named free or those the
        notices announce, which it covers. Its free chunks may be taken since: next() then
        lists at once. A worker that published a chunk since its last listing, when the shared
        one shows nothing free, checks a few of its pending claims' outputs: all there, and the
        run may be done, so it lists (the last publisher's listing is the one that finds every
        chunk done and posts `done`; a shared listing made before that publish cannot)."""
        try:
            shared = SharedListing.parse(self.run.fs.read(SHARED_LISTING), self.n)
        except OSError:
            return False
        if shared is None or shared.token == self._used or not set(freed) <= set(shared.freed):
            return False
        if self._published and not shared.free and not shared.more_free and not shared.all_done:
            pool = shared.pool
            look = clock.rng().sample(pool, min(SHARED_TRIES, len(pool)))
            missing = [c for c in look if self.run.fs.stat(self.run.out_name(c)) is None]
            if not missing:
                return False  # (an empty pool too)
            self._watch = missing
        self._used = shared.token
        self.shared_used += 1
        free = shared.free
        self._free = sorted(clock.rng().sample(free, min(SHARED_TRIES, len(free))))
        self._more_free = shared.more_free or len(free) > len(self._free)
        self._pool = list(shared.pool)
        self._all_done = shared.all_done
        return True

    def unclaimed(self) -> set[int]:
        """Chunks neither claimed nor done, from a listing of its own (for a straggler deciding
        to leave the tail: a look every few minutes)."""
        return set(range(self.n)) - self.run.claimed_chunks() - self.run.output_files()

    def published(self) -> None:
        """This worker published a chunk: its next look lists the run (the last publisher's
        listing is the one that finds every chunk done)."""
        self._quiet, self._published, self._published_at = False, True, clock.now()

    def _rewatch(self) -> None:
        """A publisher's look saw outputs missing: others still running, or published a moment
        ago and hidden by this client's caches. Two last publishers a moment apart each miss
        the other's output; each then waited out a lease before any listed the run done (the
        protocol simulator's end invariant found it). So at each idle look, for FS_CACHE_S
        after its publish, it stats the first output still missing (one call); once all it
        missed are there it lists again, as a publisher. One still missing after that is
        running: its publisher's own look finds the run done."""
        if clock.now() - self._published_at > FS_CACHE_S:
            self._watch = []
        while self._watch and self.run.fs.stat(self.run.out_name(self._watch[0])) is not None:
            self._watch.pop(0)
            if not self._watch:
                self._quiet, self._listed, self._published = False, float("-inf"), True

    def _news(self) -> str | None:
        """One call: "done" when a listing found every chunk done, "freed" when a chunk was
        released unfinished since this worker went quiet, else None."""
        names = set(self.run.fs.listdir(NOTICES))
        if "done" in names:
            return "done"
        fresh = any(n.startswith("freed-") for n in names - self._notices)
        self._notices = names  # (read before the listing this look may make: none is missed)
        return "freed" if fresh and self._quiet else None

    def _try(self, cid: int, skip) -> str:
        """One of "won", "taken" (by someone, or done) or "left" (won, but `skip` says leave it
        for now: released again, and said)."""
        if not try_claim(self.run, cid, self.owner):
            return "taken"
        if self.run.chunk_done(cid):
            release(self.run, cid, self.owner)
            return "taken"
        if skip(cid):
            release(self.run, cid, self.owner)
            post_freed(self.run)
            return "left"
        return "won"

    def _from_free(self, skip) -> int | None:
        while self._free:
            cid = self._free.pop(0)
            if self._try(cid, skip) == "won":
                return cid
        return None

    def next(self, skip=lambda cid: False) -> int | None:
        """Claim a chunk; never one `skip` says to leave for now (a suspect while others run)."""
        while self.stripe:
            got = self._try(self.stripe[0], skip)
            if got == "left":
                break  # kept in the stripe, for later
            cid = self.stripe.pop(0)
            if got == "won":
                return cid
        if not self._quiet and clock.now() - self._listed > LIST_FRESH_S:
            self._list()
        cid = self._from_free(skip)
        if cid is None and self._shared and (self._more_free or not self._pool):
            self._list()  # a shared listing whose free chunks were taken since: list now, not a look later
            cid = self._from_free(skip)
        if cid is not None:
            return cid
        # stale claims: a random sample, not all of them (every idle worker looks once: a sweep
        # of every claim by every worker costs O(workers^2) calls on the metadata server); a
        # relaunch drops the rest (release_dead)
        if clock.now() < self._expiry_due:
            return None  # no sampled claim can have gone stale yet (idle_wait read their holders)
        now = fs_now(self.run.fs, "claims")
        pool = self._pool
        for cid in sorted(clock.rng().sample(pool, min(self.sample, len(pool)))):  # a small run: all, in order
            st = self.run.fs.stat(self.run.claim_name(cid))
            if st is None:
                self._drop(cid)  # published (or released: a notice says so) since the listing
                continue
            if (
                _stale(self.run, self.run.claim_name(cid), self.lease_s, now, st, cid)
                and not skip(cid)  # (a look at its attempts: only for a stale claim)
                and take_over(self.run, cid, self.owner, self.lease_s)
            ):
                if not self.run.chunk_done(cid):
                    return cid
                release(self.run, cid, self.owner)
                self._drop(cid)
        return None

    def _published_since(self, cid: int) -> bool:
        """A live holder's claim whose chunk has its output: its release failed (release reads
        the claim's owner first, and a read error leaves the claim). Waiting on it waited for
        ever: every idle worker kept a pool of that one claim, never listed again, and never
        saw a dead holder's claim beside it (the protocol simulator, seed 2307 of a search of
        requeues with EIO). One stat, only for a sampled claim whose holder lives."""
        return self.run.fs.stat(self.run.out_name(cid)) is not None

    def _drop(self, cid: int) -> None:
        """A kept claim is gone: forget it; with none left kept, the next look lists again."""
        if cid in self._pool:
            self._pool.remove(cid)
        if not self._pool:
            self._quiet = False

    def idle_wait(self, poll_s: float = 10.0) -> float | None:
        """After next() found nothing: None when every chunk is done (a `done` notice, or a
        fresh listing: then this worker posts it), else how long to wait before looking
        again: at most `poll_s` (an idle worker ends within a poll of the run's end), and
        until the first sampled claim not done could go stale (its holder's heartbeat older
        than the lease), when the claims are read again. An idle worker that waits and looks
        again takes over a dead holder's chunk without a relaunch, within a lease and a poll
        of the death."""
        news = self._news()
        if news == "done":
            return None
        if news == "freed":
            self._quiet, self._listed = False, float("-inf")
        if self._watch:
            self._rewatch()
        if not self._quiet and clock.now() - self._listed > LIST_FRESH_S:
            self._list(self._notices)  # (the notices _news just read)
        if self._all_done:
            post_done(self.run)
            return None
        if self._free or self._more_free or not self._pool:
            # a chunk came free (a claim released), or one listed free was taken since (not
            # yet seen claimed): look again soon
            return 0.5
        self._quiet = True
        due = self._expiry_due - clock.now()
        if due > 0:
            return min(poll_s, due)
        wait = self._expiry()
        self._expiry_due = clock.now() + wait
        return min(poll_s, wait if self._pool else 0.5)

    def _expiry(self) -> float:
        """Seconds until the first of a sample of the claims not done could go stale."""
        pool = self._pool
        now = fs_now(self.run.fs, "claims")
        waits = []
        for cid in sorted(clock.rng().sample(pool, min(self.sample, len(pool)))):
            st = self.run.fs.stat(self.run.claim_name(cid))
            if st is None:
                # done, released or taken over since the listing: forgotten (a release is a notice)
                self._drop(cid)
                continue
            owner = read_owner(self.run.fs, self.run.claim_name(cid))
            if owner is None:
                waits.append(OWNERLESS_GRACE_S - (now - st.mtime))
                continue
            found = read_beat(self.run.fs, self.run.heartbeat_name(owner.worker_id), now)
            if found is None or (found[0].get("host"), found[0].get("pid")) != (owner.host, owner.pid):
                waits.append(self.lease_s - (now - st.mtime) if found is None else 0.0)
            elif self._published_since(cid):
                self._drop(cid)
            elif not holds(found[0], cid):  # just claimed, or disowned (see disowned)
                waits.append(self.lease_s / 2 - (now - st.mtime))
            else:
                waits.append(self.lease_s - found[1])
        return min(self.lease_s, max(1.0, min(waits, default=self.lease_s) + 0.5))
