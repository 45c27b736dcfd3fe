"""The tail of a run: a straggler paces itself, and an idle worker backs up the chunk most
likely to finish last (MapReduce's backup tasks). Both read a sample of the live workers'
heartbeats, never a sweep of the run: every idle worker asks at the tail.
bench/balance.py simulates the same policies. Standard library only."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from . import clock
from .beats import live, rate, read_beat
from .claims import Owner, sample_size
from .layout import RunDir, chunk_id_of
from .lease import fs_now

BACKUPS = "claims/backups"  # backup markers, apart from the claims: a worker running a chunk
# looks here (a few names) to learn whether another copy of it may be published


def backed_up(run: RunDir) -> set[int]:
    """Chunks with a backup copy marked (one listing of a folder of a few names)."""
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
    listed, names = _names.get(key, (float("-inf"), []))
    if clock.monotonic() - listed > NAMES_TTL_S:
        try:
            names = [n for n in run.fs.listdir("heartbeats") if n.endswith(".json") and n != f"{worker_id}.json"]
        except OSError:
            return None
        _names[key] = (clock.monotonic(), names)
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
