"""Chunk progress from the heartbeats, for the worker's backup choice (standard library only)."""

from __future__ import annotations

import json
import os

from .rundir import RunDir


def progress_by_chunk(run: RunDir) -> dict[int, int]:
    """Records finished so far in each chunk in flight, per the holders' latest heartbeats."""
    out: dict[int, int] = {}
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
        for cid, done in (beat.get("in_flight") or {}).items():
            out[int(cid)] = max(out.get(int(cid), 0), int(done))
    return out
