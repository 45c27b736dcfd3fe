"""The run's timeline picture: one lane per worker, one bar per chunk, engine start shaded.

Drawn at merge time from the chunk outputs' trailers (worker, started, finished) and the
heartbeats (worker start, engine start). It shows at a glance whether workers were busy
to the end, how long model loading took, and which worker was slow or died.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..rundir.fsio import Dir


def draw_timeline(dest: "Dir", chunks: list[dict], beats: list[dict], title: str | None = None) -> str | None:
    """Write timeline.png into `dest` (the run directory, or a merge's --out); returns its
    name, or None with no data."""
    timed = [c for c in chunks if c.get("started") and c.get("finished")]
    if not timed:
        return None
    import matplotlib

    matplotlib.use("Agg")  # login nodes have no display
    import matplotlib.pyplot as plt

    t0 = min([c["started"] for c in timed] + [b["started"] for b in beats if b.get("started")])
    workers = sorted({c["worker"] for c in timed} | {b["worker"] for b in beats if "worker" in b})
    lane = {w: i for i, w in enumerate(workers)}
    fig, ax = plt.subplots(figsize=(11, max(2.4, 1.2 + 0.45 * len(workers))))
    for b in beats:
        if b.get("worker") in lane and b.get("started") and b.get("engine_start_s"):
            ax.barh(
                lane[b["worker"]],
                b["engine_start_s"],
                left=b["started"] - t0,
                color="0.85",
                height=0.8,
                label="engine start",
            )
    span = max(c["finished"] for c in timed) - t0 or 1.0
    for c, (slot, slots) in zip(timed, _slots(timed)):
        height = 0.7 / slots
        y, width = lane[c["worker"]] - 0.35 + height * (slot + 0.5), c["finished"] - c["started"]
        ax.barh(
            y,
            width,
            left=c["started"] - t0,
            height=height,
            color=f"C{c['id'] % 10}",
            edgecolor="black",
            linewidth=0.3,
            alpha=0.8,
            label="chunk (number = chunk id)",
        )
        if width > span / 60:  # label the bar with its chunk id where it fits
            ax.text(
                c["started"] - t0 + width / 2,
                y,
                str(c["id"]),
                ha="center",
                va="center",
                fontsize=max(5, min(8, 40 / slots)),
            )
    ax.set_yticks(range(len(workers)), [str(w) for w in workers], fontsize=7)
    ax.set_ylabel("worker")
    ax.set_xlabel("seconds since the first worker started")
    n_chunks, n_workers = len(timed), len(workers)
    ax.set_title(
        f"{title or os.path.basename(dest.path)}: {n_chunks} chunk{'s' * (n_chunks != 1)} on {n_workers} "
        f"worker{'s' * (n_workers != 1)} (stacked bars: chunks in one engine at once)",
        fontsize=9,
    )
    handles, labels = ax.get_legend_handles_labels()
    first = {label: h for h, label in zip(handles, labels)}
    if first:
        ax.legend(
            list(first.values()),
            list(first.keys()),
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            fontsize=7,
            frameon=False,
        )  # beside the lanes, never over a bar
    fig.tight_layout()
    with dest.writing("timeline.png") as f:  # through the folder's pinned handle
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return "timeline.png"


def _slots(chunks: list[dict]) -> list[tuple[int, int]]:
    """(sub-row, sub-rows in the lane) per chunk, so chunks in flight together stack."""
    by_worker: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_worker.setdefault(c["worker"], []).append(i)
    result = [(0, 1)] * len(chunks)
    for idx in by_worker.values():
        ends: list[float] = []  # per sub-row, when its last chunk finished
        slot_of = {}
        for i in sorted(idx, key=lambda i: chunks[i]["started"]):
            free = next((s for s, e in enumerate(ends) if e <= chunks[i]["started"]), None)
            if free is None:
                free = len(ends)
                ends.append(0.0)
            ends[free] = chunks[i]["finished"]
            slot_of[i] = free
        for i in idx:
            result[i] = (slot_of[i], len(ends))
    return result
