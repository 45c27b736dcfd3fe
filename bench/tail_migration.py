"""What would close the balance gap at the end of a run: three tail policies, side by side.

The protocol's balance (bench/metadata_sim.py --balance) sits at 0.965-0.971 at 1,000
workers, under the issue's 0.97, and a dispatcher that hands single records to any engine
with room at no claim cost does no better (docs/measurements.md). So the gap is not in the
claiming: it is the heavy tail of output lengths. Once every record has started, an engine
that happened to start several long ones decodes them in a full batch (slow steps) while
others idle. This model asks what a policy *after* the pool is empty can do:

  none     the dispatcher alone: the bound of what claiming can reach
  restart  an engine `--gap` or more records lighter than the most loaded one takes that
           engine's youngest record and starts it again from zero (a backup copy of a record,
           the original dropped: no continuation needed)
  migrate  the same engine takes the *oldest* record with its progress, paying a prefill of
           what it generated (p s a token), as Llumnix moves requests between vLLM instances

One engine model for all three: step = a + c x running (bench/engine_model.json, measured
from vLLM), one simulated step standing for 100 tokens, lengths the fake engine's (log-normal,
median 300 tokens, sigma 1, at most 4,100; `--draws` salts them as bench/metadata_sim.py
does). Balance = mean over engines of their last finish / the latest, as metadata_sim.py.

    .venv/bin/python bench/tail_migration.py [--workers 64 200 1000] [--draws 1] [--gap 8]

Nothing here is built into the worker: migrate needs vLLM to continue a record from its
generated tokens and a chunk's rows from two workers (docs/decisions.md, "Tail migration").
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOKENS_PER_STEP = 100  # as bench/metadata_sim.py
RECORDS_PER_WORKER = 2048


def _most_loaded(loads: list[tuple[int, int]], running: list, w: int) -> int | None:
    """The engine other than `w` with the most running records, from a lazy max-heap of
    (-count, engine) whose stale entries are dropped as they surface."""
    held = None
    src = None
    while loads:
        neg, i = loads[0]
        if -neg != len(running[i]) or not running[i]:
            heapq.heappop(loads)
            continue
        if i == w:
            held = heapq.heappop(loads)
            continue
        src = i
        break
    if held:
        heapq.heappush(loads, held)
    return src


def run(lens: list[int], workers: int, m: dict, policy: str, gap: int) -> tuple[float, float, int]:
    """One whole run; (balance, makespan s, records moved). Engines take records in input
    order as they have room (max_num_seqs); after the last is taken, `policy` acts at each
    engine's step."""
    a, c, p, seqs = m["a"] * TOKENS_PER_STEP, m["c"] * TOKENS_PER_STEP, m["p"], m["max_num_seqs"]
    total = len(lens)
    running: list[list[list[int]]] = [[] for _ in range(workers)]  # per engine: [steps left, length]
    loads: list[tuple[int, int]] = []  # lazy max-heap of (-running, engine) once the pool is empty
    ends = [0.0] * workers
    nxt = moved = 0
    steps = [(0.0, w) for w in range(workers)]
    while steps:
        t, w = heapq.heappop(steps)
        mine = running[w]
        take = min(seqs - len(mine), total - nxt)
        mine.extend([lens[i], lens[i]] for i in range(nxt, nxt + take))
        nxt += take
        extra = 0.0
        if policy != "none" and nxt == total:
            if not loads:
                loads = [(-len(x), i) for i, x in enumerate(running) if x]
                heapq.heapify(loads)
            while len(mine) < seqs:
                src = _most_loaded(loads, running, w)
                if src is None or len(running[src]) < len(mine) + gap:
                    break
                theirs = running[src]
                if policy == "migrate":  # the oldest, with what it generated (recomputed here)
                    k = max(range(len(theirs)), key=lambda i: theirs[i][1] - theirs[i][0])
                    rec = theirs.pop(k)
                    extra += p * (rec[1] - rec[0]) * TOKENS_PER_STEP
                else:  # the youngest, from zero
                    k = min(range(len(theirs)), key=lambda i: theirs[i][1] - theirs[i][0])
                    rec = theirs.pop(k)
                    rec = [rec[1], rec[1]]
                mine.append(rec)
                moved += 1
                heapq.heappush(loads, (-len(theirs), src))
        if mine:
            t += a + c * len(mine) + extra
            running[w] = mine = [x for x in mine if x[0] > 1]
            for x in mine:
                x[0] -= 1
            ends[w] = t
            heapq.heappush(steps, (t, w))
            if loads:
                heapq.heappush(loads, (-len(mine), w))
    return statistics.mean(ends) / max(ends), max(ends), moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[64, 200, 1000])
    ap.add_argument("--draws", type=int, default=1, help="length draws per row (0, 1, ...), as metadata_sim.py")
    ap.add_argument("--gap", type=int, default=8, help="records an engine must be lighter by to take one")
    args = ap.parse_args()

    import metadata_sim
    from hpc_infer.worker.fake_engine import FakeEngine

    m = json.loads((ROOT / "bench" / "engine_model.json").read_text())
    print(f"engine model: {m['source']}")
    print(f"{RECORDS_PER_WORKER} records a worker, one step = {TOKENS_PER_STEP} tokens, gap {args.gap}")
    print("| workers | draw | none: balance, makespan | restart youngest | migrate oldest | moved | to run |")
    print("|---|---|---|---|---|---|---|")
    for workers in args.workers:
        for draw in range(args.draws):
            t0 = time.perf_counter()
            eng = FakeEngine({"lengths": metadata_sim.lengths(draw)})
            lens = [eng._length(f"r{i}") for i in range(RECORDS_PER_WORKER * workers)]
            rows = {pol: run(lens, workers, m, pol, args.gap) for pol in ("none", "restart", "migrate")}
            b0, mk0, _ = rows["none"]
            cells = [f"{b0:.4f}, {mk0:.1f} s"]
            for pol in ("restart", "migrate"):
                b, mk, _ = rows[pol]
                cells.append(f"{b:.4f} ({b / b0:.3f}x), {mk:.1f} s ({mk / mk0:.3f}x)")
            print(
                f"| {workers} | {draw} | {' | '.join(cells)} | {rows['restart'][2]} / {rows['migrate'][2]} "
                f"| {time.perf_counter() - t0:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
