"""Every interleaving of a few threads' calls on one run directory handle (rundir/fsio.Dir).

The protocol simulator (simulation.py) moves a worker one whole turn at a time, so two
copies of a chunk never interleave *inside* a publish there. Here each thread runs real
code against a real PinnedDir, pauses before every call it makes on the handle, and only
one runs at a time, in the order a schedule gives: `explore` tries every schedule up to
`depth` choices (deduplicated by the order the calls really ran in). A race that needs one
copy to act between another's check and its act is found deterministically, without a
sleep or a lucky timing.
"""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from hpc_infer.rundir.fsio import Dir, PinnedDir

_NOT_A_STEP = {"where", "tag", "client_now", "path", "close", "fd_path"}


class _Paused:
    """A Dir whose every call waits for this thread's turn first."""

    def __init__(self, fs: Dir, pause: Callable[[str], None]):
        self._fs, self._pause = fs, pause

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if name in _NOT_A_STEP or not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._pause(name)
            return attr(*args, **kwargs)

        return call


def run_interleaved(fs: Dir, actors: list[Callable[[Dir], object]], choices: Iterable[int]):
    """Run the actors (each gets the handle) one handle call at a time; `choices` picks who
    goes next among those still running (modulo their number; when choices run out, the
    first). Returns (results, errors, the order the calls ran in as (actor, call name))."""
    n = len(actors)
    go = [threading.Semaphore(0) for _ in range(n)]
    parked = threading.Semaphore(0)
    done = [False] * n
    results: list[object] = [None] * n
    errors: list[BaseException | None] = [None] * n
    pending: list[str] = [""] * n
    order: list[tuple[int, str]] = []

    def body(i: int) -> None:
        def pause(call: str) -> None:
            pending[i] = call
            parked.release()
            go[i].acquire()

        try:
            results[i] = actors[i](_Paused(fs, pause))
        except BaseException as e:  # the invariant check decides what an error means
            errors[i] = e
        finally:
            done[i] = True
            parked.release()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
        parked.acquire()  # it waits at its first call (or has ended)
    picks = iter(choices)
    while not all(done):
        alive = [i for i in range(n) if not done[i]]
        i = alive[next(picks, 0) % len(alive)]
        order.append((i, pending[i]))
        go[i].release()
        parked.acquire()
    for t in threads:
        t.join()
    return results, errors, order


def explore(
    tmp: Path,
    setup: Callable[[Dir], None],
    actors: list[Callable[[Dir], object]],
    check: Callable[[Dir, list, list], str | None],
    depth: int = 12,
) -> tuple[int, list[tuple[list, str]]]:
    """Every schedule of `depth` choices between the actors, each on a fresh directory made
    by `setup`; `check(fs, results, errors)` returns what broke, or None. Returns how many
    distinct interleavings ran, and the broken ones (the order the calls ran in, what broke)."""
    seen: set[tuple] = set()
    broken: list[tuple[list, str]] = []
    for k, choices in enumerate(itertools.product(range(len(actors)), repeat=depth)):
        folder = tmp / f"i{k}"
        folder.mkdir()
        fs = PinnedDir(folder)
        try:
            setup(fs)
            results, errors, order = run_interleaved(fs, actors, choices)
            key = tuple(order)
            if key in seen:
                continue
            seen.add(key)
            what = check(fs, results, errors)
            if what:
                broken.append((order, what))
        finally:
            fs.close()
            shutil.rmtree(folder)
    return len(seen), broken
