"""Chunk progress from the heartbeats, for the worker's backup choice (standard library only)."""

from __future__ import annotations

import json
import os

from .rundir import RunDir


def progress_by_chunk(run: RunDir, rates: list[float] | None = None) -> dict[int, tuple[int, float]]:
    """(records finished so far, the holder's records per second) for each chunk in flight,
    per the holders' latest heartbeats; `rates` collects every worker's rate."""
    out: dict[int, tuple[int, float]] = {}
    try:
        names = os.listdir(run.heartbeats)
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(run.heartbeats / name, "rb") as f:
                beat = json.loads(f.read())
        except (OSError, ValueError):
            continue
        elapsed = max(float(beat.get("t", 0)) - float(beat.get("started", 0)), 1e-6)
        rate = (int(beat.get("records_done", 0)) + sum((beat.get("in_flight") or {}).values())) / elapsed
        if rates is not None and beat.get("records_done"):
            rates.append(rate)
        for cid, done in (beat.get("in_flight") or {}).items():
            if int(done) >= out.get(int(cid), (-1, 0.0))[0]:
                out[int(cid)] = (int(done), rate)
    return out
