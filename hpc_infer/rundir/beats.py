"""Other workers' heartbeats, read: whether a worker lives, and how fast it goes. A
heartbeat is one file a worker replaces every beat (worker/heartbeat.py writes it); its age
is by the file server's clock (lease.fs_now), never the reader's. Standard library only."""

from __future__ import annotations

import json

from . import schema
from .fsio import Dir


def rate(beat: dict) -> float | None:
    """A worker's records finished per second over its recent window (the `recent` samples
    of its heartbeat, one clock: the worker's own), or None before it has two samples."""
    recent = beat.get("recent") or []
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    return None


def seconds_ran(beat: dict) -> float:
    """A worker's running time over all its processes (its GPU time): a requeued task keeps
    its worker id, and `earlier_s` carries its earlier processes' time. This process's part is
    `ran_s`, measured on its monotonic clock (a clock step moves `started` and `t`, not it); a
    beat without one (an older writer) counts its wall-clock span."""
    this = beat.get("ran_s")
    if not isinstance(this, (int, float)):
        start = float(beat.get("started") or 0.0)
        this = max(0.0, float(beat.get("finished_at") or beat.get("t") or start) - start)
    return float(beat.get("earlier_s") or 0.0) + float(this)


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
