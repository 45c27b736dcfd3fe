"""Which chunk a worker tries next (Claimer), with few file-system calls at any scale:
its own stripe first, then a fresh listing's free chunks, then stale claims; an idle
worker reads notices and samples claims rather than listing the run. Standard library only."""

from __future__ import annotations

import dataclasses
import json

from . import clock
from .beats import read_beat
from .claims import (
    OWNERLESS_GRACE_S,
    Owner,
    holds,
    is_stale,
    read_owner,
    release,
    sample_size,
    take_over,
    try_claim,
)
from .layout import RunDir
from .lease import fs_now
from .notices import (
    FS_CACHE_S,
    NOTICES,
    SHARED_FREE,
    SHARED_LISTING,
    SHARED_TRIES,
    SharedListing,
    in_notices,
    post_done,
    post_freed,
)

SWEEP_SAMPLE = 16  # claims an idle worker checks for staleness (a run's dead holders are few)


LIST_FRESH_S = 0.2  # a listing older than this is made again before its free chunks are tried
FREE_KEEP = 64  # free chunks kept from a listing (tried in order within LIST_FRESH_S)
POOL_KEEP = 512  # claims not done kept from a listing, to sample for staleness while idle


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
        self._expiry_due = float("-inf")  # idle_wait: when the sampled claims are read again
        self._all_done = False  # the last listing showed every chunk's output
        self._used = ""  # the token of the shared listing this worker used last
        self._shared = False  # the last listing was a shared one
        self._published = False  # this worker published a chunk since its last listing of its own
        self._published_at = float("-inf")
        self._watch: list[int] = []  # chunks whose outputs a publisher's look missed (_rewatch)
        self.listings = 0  # listings of the run this worker made
        self.shared_used = 0  # shared listings it used instead

    def _list(self, notices: set[str] | None = None) -> None:
        """`notices`: claims/notices/ as this look already read it (idle_wait), else read here."""
        self._listed = clock.monotonic()
        self._quiet = False
        self._expiry_due = float("-inf")  # a new pool: its holders are read at the next idle look
        # the notices first: a listing, this worker's or a shared one, must cover every release
        # they announce to be used
        self._notices = set(self.run.fs.listdir(NOTICES)) if notices is None else notices
        freed = sorted(n for n in self._notices if n.startswith("freed-"))
        published, self._watch = self._published, []
        self._shared = self._use_shared(freed)
        if self._shared:
            return  # a publisher stays one (see _use_shared) until a listing of its own
        self._published = False
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
            in_notices(self.run, lambda: self.run.fs.replace(SHARED_LISTING, data))
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
        chunk done and posts `done`; a shared listing made before that publish cannot). One
        that shows chunks free leaves it a publisher: the listing may be older than its
        publish in what it saw (another client's caches hid the publish, and the claim a failed
        release left), its free chunks turn out taken or done, and the next shared listing shows
        nothing free; had the first one ended its being a publisher, no worker would list the
        run done and every idle one would wait out that claim (seed 2001532 of a sweep)."""
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
            self._watch, self._published = missing, False  # _rewatch lists, as a publisher, once they are there
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
        self._quiet, self._published, self._published_at = False, True, clock.monotonic()

    def _rewatch(self) -> None:
        """A publisher's look saw outputs missing: others still running, or published a moment
        ago and hidden by this client's caches. Two last publishers a moment apart each miss
        the other's output; each then waited out a lease before any listed the run done (the
        protocol simulator's end invariant found it). So at each idle look, for FS_CACHE_S
        after its publish, it stats the first output still missing (one call); once all it
        missed are there it lists again, as a publisher. One still missing after that is
        running: its publisher's own look finds the run done."""
        if clock.monotonic() - self._published_at > FS_CACHE_S:
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

    def _list_again(self) -> bool:
        """After a shared listing gave nothing: list now, not at a look later? When its free
        chunks were taken since (more were free, or it kept no claim to wait on), or when this
        worker is a publisher: its own listing is the one that can find the run done. A
        publisher kept quiet on a pool whose claims outlive their chunks (a release that
        failed) waited for a `done` nobody would post (seed 4011242 of a sweep). Never after
        one that found every chunk done."""
        return not self._all_done and (self._more_free or not self._pool or self._published)

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
        if not self._quiet and clock.monotonic() - self._listed > LIST_FRESH_S:
            self._list()
        cid = self._from_free(skip)
        if cid is None and self._shared and self._list_again():
            self._list()
            cid = self._from_free(skip)
        if cid is not None:
            return cid
        # stale claims: a random sample, not all of them (every idle worker looks once: a sweep
        # of every claim by every worker costs O(workers^2) calls on the metadata server); a
        # relaunch drops the rest (release_dead)
        if clock.monotonic() < self._expiry_due:
            return None  # no sampled claim can have gone stale yet (idle_wait read their holders)
        now = fs_now(self.run.fs, "claims")
        pool = self._pool
        for cid in sorted(clock.rng().sample(pool, min(self.sample, len(pool)))):  # a small run: all, in order
            st = self.run.fs.stat(self.run.claim_name(cid))
            if st is None:
                self._drop(cid)  # published (or released: a notice says so) since the listing
                continue
            if (
                is_stale(self.run, cid, self.lease_s, now, st)
                and not skip(cid)  # (a look at its attempts: only for a stale claim)
                and take_over(self.run, cid, self.owner, self.lease_s)
            ):
                if not self.run.chunk_done(cid):
                    return cid
                release(self.run, cid, self.owner)
                self._drop(cid)
        return None

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
        if not self._quiet and clock.monotonic() - self._listed > LIST_FRESH_S:
            self._list(self._notices)  # (the notices _news just read)
        if self._all_done:
            post_done(self.run)
            return None
        if self._free or self._more_free or not self._pool:
            # a chunk came free (a claim released), or one listed free was taken since (not
            # yet seen claimed): look again soon
            return 0.5
        self._quiet = True
        due = self._expiry_due - clock.monotonic()
        if due > 0:
            return min(poll_s, due)
        wait = self._expiry()
        self._expiry_due = clock.monotonic() + wait
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
            elif not holds(found[0], cid):  # just claimed, or disowned (see disowned)
                waits.append(self.lease_s / 2 - (now - st.mtime))
            else:
                waits.append(self.lease_s - found[1])
        return min(self.lease_s, max(1.0, min(waits, default=self.lease_s) + 0.5))
