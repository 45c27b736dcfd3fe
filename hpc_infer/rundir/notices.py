"""claims/notices/: what an idle worker reads instead of listing the run. `done` (a
listing found every chunk's output), `freed-*` (a claim was released with its chunk
unfinished) and `listing` (the last listing a worker made, for the others: SharedListing).
One listing of a small folder, where a listing of claims/ and out/ costs one call per
1,000 names. Standard library only."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import clock, schema
from .layout import RunDir
from .lease import unlink_quiet

NOTICES = "claims/notices"  # what an idle worker reads instead of listing the run: `done` (every
# chunk has its output) and `freed-*` (a claim was released with its chunk unfinished)
DONE_NOTICE = f"{NOTICES}/done"
SHARED_LISTING = f"{NOTICES}/listing"  # the last listing a worker made, for the others (Claimer._list)
SHARED_FREE = 64  # free chunks a shared listing names (the first ones: the largest)
SHARED_TRIES = 8  # of its free chunks a worker tries (at random), and of its claims a publisher checks
FS_CACHE_S = 60.0  # the longest a file server's client may hide a new file (NFS's acregmax and acdirmax default)


def in_notices(run: RunDir, write) -> None:
    """Write into claims/notices/, the folder made on first use (no notice yet, or a run
    planned before notices)."""
    try:
        write()
    except FileNotFoundError:
        run.fs.mkdir(NOTICES)
        write()


def _post(run: RunDir, name: str) -> None:
    in_notices(run, lambda: run.fs.create(name, b""))


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
