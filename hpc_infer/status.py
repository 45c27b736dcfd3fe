"""Progress from the run directory: done chunks, heartbeats, job states; the wait loop."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from .rundir import RunDir, read_json


@dataclass
class Progress:
    n_records: int
    n_chunks: int
    chunks_done: int
    records_done: int  # finished chunks plus records finished inside running chunks
    output_tokens: int
    workers: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.n_chunks


def read_heartbeats(run: RunDir) -> list[dict]:
    beats = []
    for path in sorted(run.heartbeats.glob("*.json")):
        try:
            beats.append(read_json(path))
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now
    return beats


def snapshot(run: RunDir, manifest: dict | None = None) -> Progress:
    manifest = manifest or read_json(run.manifest)
    sizes = {c["id"]: c["n_records"] for c in manifest["chunks"]}
    done = run.done_chunks() & sizes.keys()
    beats = read_heartbeats(run)
    in_flight = sum(n for b in beats for c, n in (b.get("in_flight") or {}).items() if int(c) not in done)
    return Progress(
        n_records=manifest["n_records"],
        n_chunks=manifest["n_chunks"],
        chunks_done=len(done),
        records_done=sum(sizes[c] for c in done) + in_flight,
        output_tokens=sum(b.get("output_tokens", 0) for b in beats),
        workers=beats,
    )


def wait(run: RunDir, job_states: Callable[[], dict[str, str]], poll_s: float = 2.0, show: bool = True) -> Progress:
    """Block until every chunk is done, or no job is left that could finish one."""
    from tqdm import tqdm

    from .submit import TERMINAL

    manifest = read_json(run.manifest)
    p = snapshot(run, manifest)
    start_tokens, t0 = p.output_tokens, time.time()
    bar = tqdm(total=p.n_records, initial=p.records_done, unit="rec", desc=run.root.name, disable=not show,
               file=sys.stderr, dynamic_ncols=True)
    while True:
        p = snapshot(run, manifest)
        states = job_states()
        failed = sum(1 for s in states.values() if s in TERMINAL and s != "COMPLETED")
        running = sum(1 for s in states.values() if s == "RUNNING")
        rate = (p.output_tokens - start_tokens) / max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"tok/s={rate:,.0f} running={running} failed={failed}", refresh=False)
        bar.update(max(0, p.records_done - bar.n))
        if p.complete:
            break
        if states and all(s in TERMINAL for s in states.values()):
            p = snapshot(run, manifest)  # a last look: the final rename may have just landed
            if not p.complete:
                break
        time.sleep(poll_s)
    bar.close()
    return p


def describe(run: RunDir, states: dict[str, str]) -> str:
    """The `hpc-infer status` text: per task state, chunks done, tokens/s, ETA."""
    manifest = read_json(run.manifest)
    p = snapshot(run, manifest)
    now = time.time()
    lines = [f"run {run.root}",
             f"  chunks {p.chunks_done}/{p.n_chunks}   records {p.records_done}/{p.n_records}   "
             f"output tokens {p.output_tokens:,}"]
    live = [b for b in p.workers if b.get("state") in ("starting", "loading", "running") and now - b.get("t", 0) < 120]
    if live:
        rate = sum(b.get("records_done", 0) / max(now - b.get("started", now), 1e-9) for b in live)
        tok = sum(b.get("output_tokens", 0) / max(now - b.get("started", now), 1e-9) for b in live)
        eta = (p.n_records - p.records_done) / rate if rate > 0 else float("nan")
        lines.append(f"  {len(live)} live workers   {tok:,.0f} tok/s   ETA {eta:,.0f} s")
    if states:
        lines.append("  tasks:")
        for job_id, state in sorted(states.items()):
            lines.append(f"    {job_id:>14}  {state}")
    for b in p.workers:
        age = now - b.get("t", now)
        chunks = ",".join(map(str, (b.get("in_flight") or {}).keys())) or "-"
        lines.append(f"  worker {b['worker']:>14}  {b.get('state', '?'):9} chunks={chunks}  "
                     f"chunks_done={b.get('chunks_done', 0)}  records={b.get('records_done', 0)}  "
                     f"last heartbeat {age:.0f}s ago")
    missing = sorted(set(range(p.n_chunks)) - run.done_chunks())
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        lines.append(f"  chunks not done: {shown}")
    return "\n".join(lines)
