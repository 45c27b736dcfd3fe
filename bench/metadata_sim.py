"""Metadata calls per second at 1,000 and 10,000 workers, counted exactly by the protocol
simulator (tests/simulation.py over rundir/simfs.py), launcher included.

The real worker, claims, leases, publish and the launcher's progress poll run unchanged over
the simulated file server, which counts every call that reaches it (open, stat, readdir,
create, rename, link, unlink, setattr, mkdir). No attribute cache (`ac_s=0`): every stat and
listing reaches the server, as `strace` counts them (bench/metadata_ops.py counts real
processes' system calls the same way, at 16-1,000 workers: the calibration).

Steady state: every worker busy on chunks of `--records` records, each chunk `--chunk-s`
simulated seconds long (the fake engine: `--records` sequences at once, 9 steps), the
window from `--warm` to `--warm + --window` simulated seconds. The budget: 500 calls/s at
1,000 workers and 2,000/s at 10,000.

    .venv/bin/python bench/metadata_sim.py                      # 1,000 and 10,000 workers
    .venv/bin/python bench/metadata_sim.py --workers 16 64 256  # the strace bench's sizes
    .venv/bin/python bench/metadata_sim.py --balance --workers 1000   # whole runs, heavy-tailed lengths
    .venv/bin/python bench/metadata_sim.py --balance --dispatch --draws 4 --workers 64 200   # and the comparison
    .venv/bin/python bench/metadata_sim.py --calibrate --workers 16 64 256 1000   # against strace of real workers
    .venv/bin/python bench/metadata_sim.py --calibrate-chunks   # calls per chunk, against strace (16 workers)

`--balance` runs whole runs instead (`--records-per-worker`, 2,000 by default, cut by the
planner into `--chunks-per-worker` guided chunks), each record's output length log-normal
(drawn from its id: median 300 tokens, sigma 1, at most 4,100, as bench/balance.py), the
engine's step cost that of the real one (a + c x running requests, bench/engine_model.json;
one simulated step stands for 100 tokens), and prints balance = the mean over workers of
when each published its last chunk / the latest of those (1.0: every worker ran out of work
at the same moment); the goal is 0.97. It also prints calls a second over the whole run, in
its middle (20-80% of the makespan) and in its last fifth. A listing of a folder counts one
call per 1,000 names (rundir/simfs.py: DIRENTS_PER_CALL, what getdents64 returns).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def layout(tmp: Path, workers: int, chunks_per_worker: int, records: int):
    import simulation as S

    lay = S.sized_layout(tmp, workers, chunks_per_worker, records, "bench")
    lay.ids = []  # the bench checks no ids
    return lay


def run_quiet(sim) -> float:
    """Run a simulation with its output silenced, every simulated worker sharing one parse of
    the big manifest (the fake server's bytes are one object); returns the wall seconds."""
    from hpc_infer.rundir import layout as rundir_layout

    parsed: dict = {}
    original = rundir_layout.RunDir.read_json

    def read_json(self, name):
        data = self.fs.read(name)
        key = (name, id(data))
        if key not in parsed:
            parsed[key] = (data, json.loads(data))
        return parsed[key][1]

    rundir_layout.RunDir.read_json = read_json
    t0 = time.time()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            sim.run()
    finally:
        rundir_layout.RunDir.read_json = original
    return time.time() - t0


def window_calls(sim, warm: float) -> tuple[float, collections.Counter, float]:
    """Run `sim` quietly: (wall seconds, the calls counted from the first step at or after
    `warm` simulated seconds to the end, that span in simulated seconds)."""
    marks: dict = {}

    def mark() -> None:  # the counters when the window opens (check_step runs after every step)
        if "start" not in marks and sim.t >= warm:
            marks["start"] = (sim.t, collections.Counter(sim.server.calls))

    sim.check, sim.check_step, sim.check_end = True, mark, lambda: None
    wall = run_quiet(sim)
    start_t, start = marks["start"]
    return wall, sim.server.calls - start, sim.t - start_t


def measure(lay, workers: int, records: int, chunk_s: float, warm: float, window: float) -> dict:
    import simulation as S

    sched = S.Schedule(0, "bench", workers, [], skew=[0.0])
    engine = {"step_s": chunk_s / 9, "max_num_seqs": records, "tokens": 9}
    beat = json.loads(lay.files["worker.json"])["heartbeat_s"]  # the plan's: longer at scale (rundir/lease.py)
    sim = S.Sim(sched, lay, engine=engine, check=False, launcher_poll=True, t_max=warm + window, heartbeat_s=beat)
    wall, calls, span = window_calls(sim, warm)
    done = sum(1 for n in sim.server.lookup(["run", "out"]).entries if n.endswith(".jsonl"))
    return {
        "workers": workers,
        "chunks": lay.n_chunks,
        "heartbeat_s": beat,
        "calls_per_s": round(sum(calls.values()) / span, 1),
        "per_worker_s": round(sum(calls.values()) / span / workers, 4),
        "by_kind": dict(sorted(((k, round(v / span, 1)) for k, v in calls.items()), key=lambda kv: -kv[1])),
        "chunks_done": done,
        "window_s": round(span, 1),
        "wall_s": round(wall, 1),
    }


TOKENS_PER_STEP = 100  # one simulated engine step stands for this many decode steps


def lengths(draw: int) -> dict:
    """The fake engine's output lengths in steps (worker/fake_engine.py): log-normal, median
    300 tokens, sigma 1, at most 4,100; `draw` 0 is the one every earlier figure used."""
    return {"median": 3, "sigma": 1.0, "max": 41, "salt": f"{draw}:" if draw else ""}


def balance(lay, workers: int, draw: int = 0) -> dict:
    """A whole run with heavy-tailed lengths and the real engine's step cost (a + c x batch,
    bench/engine_model.json, as bench/balance.py), one simulated step standing for
    TOKENS_PER_STEP tokens: lengths log-normal, median 300 tokens, sigma 1, at most 4,100;
    `draw`: which draw of the lengths (0: the one every earlier figure used)."""
    import simulation as S

    m = json.loads((ROOT / "bench" / "engine_model.json").read_text())
    sched = S.Schedule(0, "bench", workers, [], skew=[0.0])
    engine = {
        "step_s": m["a"] * TOKENS_PER_STEP,
        "step_per_seq_s": m["c"] * TOKENS_PER_STEP,
        "max_num_seqs": m["max_num_seqs"],
        "lengths": lengths(draw),
        "lean": True,  # rows without the input's copy: 10,000 workers' unpublished rows fit in memory
    }
    beat = json.loads(lay.files["worker.json"])["heartbeat_s"]
    sim = S.Sim(sched, lay, engine=engine, check=False, launcher_poll=True, t_max=10**7, heartbeat_s=beat)
    sim.check_end = lambda: None
    marks: list[tuple[float, int]] = []  # (simulated s, calls so far), every 10 s

    def mark() -> None:
        if not marks or sim.t >= marks[-1][0] + 10:
            marks.append((sim.t, sum(sim.server.calls.values())))

    sim.check, sim.check_step = True, mark
    wall = run_quiet(sim)
    last: dict[str, float] = {}
    out = sim.server.lookup(["run", "out"])
    for name, ino in out.entries.items():
        trailer = json.loads(sim.server.nodes[ino].data.splitlines()[-1])
        w = trailer["worker"]
        last[w] = max(last.get(w, 0.0), trailer["finished"] - S.EPOCH)
    ends = sorted(last.values())
    calls = sum(sim.server.calls.values())

    def rate(lo: float, hi: float) -> float:  # calls a second between two shares of the makespan
        a = min(marks, key=lambda m: abs(m[0] - lo * ends[-1]))
        b = min(marks, key=lambda m: abs(m[0] - hi * ends[-1]))
        return round((b[1] - a[1]) / max(b[0] - a[0], 1e-9), 1)

    return {
        "workers": workers,
        "chunks": lay.n_chunks,
        "published": len(out.entries),
        "calls_per_s": round(calls / ends[-1], 1) if ends else 0.0,  # the whole run, launcher included
        "steady_calls_per_s": rate(0.2, 0.8) if ends else 0.0,  # the middle of the run
        "tail_calls_per_s": rate(0.8, 1.0) if ends else 0.0,  # its last fifth: every worker idle, looking
        "by_kind": dict(
            sorted(((k, round(v / ends[-1], 1)) for k, v in sim.server.calls.items()), key=lambda kv: -kv[1])
        )
        if ends
        else {},
        # whole listings of claims/ and out/ (a worker with nothing of its own left looking
        # for free chunks): one call per 1,000 names each, so their share grows with the run
        "listings_per_worker": round(sum(p.worker.claimer.listings for p in sim.procs if p.worker) / workers, 2),
        "balance": round(sum(ends) / len(ends) / ends[-1], 4) if ends else 0.0,
        "makespan_s": round(ends[-1], 1) if ends else 0.0,
        "wall_s": round(wall, 1),
    }


def single_record_dispatch(
    workers: int, records: int, draw: int = 0, longest_first: bool = False
) -> tuple[float, float]:
    """Balance and makespan of a dispatcher of single records, in input order, to any engine
    with room, at no claim cost, in the same engine model and the same draw of the lengths
    as balance(): what a scheduler that knows no output length gets without chunks or a
    file system (a comparison, not a proof of the best; returns (balance, makespan)).
    `longest_first`: the records in order of their output lengths, longest first (LPT), as
    if each length were known before its record ran: what knowing the lengths is worth."""
    import heapq

    from hpc_infer.worker.fake_engine import FakeEngine

    m = json.loads((ROOT / "bench" / "engine_model.json").read_text())
    eng = FakeEngine({"lengths": lengths(draw)})
    todo = [eng._length(f"r{i}") for i in range(records)]  # the plan's ids: r0, r1, ...
    if longest_first:
        todo.sort(reverse=True)
    a, c, seqs = m["a"] * TOKENS_PER_STEP, m["c"] * TOKENS_PER_STEP, m["max_num_seqs"]
    running: list[list[int]] = [[] for _ in range(workers)]
    ends, nxt = [0.0] * workers, 0
    steps = [(0.0, w) for w in range(workers)]  # (when engine w's next step starts, w)
    while steps:
        t, w = heapq.heappop(steps)
        take = min(seqs - len(running[w]), len(todo) - nxt)
        running[w] += todo[nxt : nxt + take]
        nxt += take
        if running[w]:
            t += a + c * len(running[w])
            running[w] = [n - 1 for n in running[w] if n > 1]
            ends[w] = t
            heapq.heappush(steps, (t, w))
    return sum(ends) / workers / max(ends), max(ends)


def stripes(sizes: list[int], workers: int) -> str:
    """How even the workers' stripes are (rundir/claimer.py: stripe): the records in the
    heaviest and the lightest against the mean, and the same for the old rule (the same
    place in every round); `sizes`: each chunk's records, in the plan's order."""
    from hpc_infer.rundir.claimer import stripe

    n, mean = len(sizes), sum(sizes) / workers

    def spread(pick) -> str:
        sums = [sum(sizes[c] for c in pick(r)) for r in range(workers)]
        return f"{max(sums) / mean - 1:+.1%} / {min(sums) / mean - 1:+.1%}"

    return (
        f"stripes' records against the mean, heaviest / lightest: {spread(lambda r: stripe(r, workers, n))} "
        f"(the same place in every round: {spread(lambda r: range(r % n, n, workers))})"
    )


def steady_per_worker(n: int, span: float) -> tuple[float, dict]:
    """The simulator in bench/metadata_ops.py's per-worker-second regime: n workers, 16n
    records in 8n chunks that never finish (a million tokens, a step every 0.5 s), the beat
    the plan gives n workers (10 s up to 500, n / 50 s past: the real workers' plan is the
    same), no launcher; calls per worker-second over a window about `span` seconds long.

    The simulator's workers beat in step (they start at once): the window opens half-way
    between two beats and is whole rounds of three beats, which hold two looks at the backup
    markers each (every 1.5 beats) whatever their phase; as near `span` (the traced real
    workers' counted seconds: whole beats, from a beat 10 s after the first claim to the last
    before the stop) as that allows. A window that ends on a beat counts a beat a worker too
    many (+33% in three beats)."""
    import simulation as S

    with tempfile.TemporaryDirectory() as tmp:
        lay = S.sized_layout(Path(tmp), n, 8, 2, "calibrate")
        lay.ids = []
        sched = S.Schedule(0, "calibrate", n, [], skew=[0.0])
        engine = {"step_s": 0.5, "max_num_seqs": 8, "tokens": 10**6}
        beat = json.loads(lay.files["worker.json"])["heartbeat_s"]
        warm, window = 1.5 * beat, 3 * beat * max(1, round(span / (3 * beat)))
        sim = S.Sim(sched, lay, engine=engine, check=False, launcher_poll=False, t_max=warm + window, heartbeat_s=beat)
        _, calls, counted = window_calls(sim, warm)
        return sum(calls.values()) / counted / n, {k: round(v / counted / n, 4) for k, v in calls.items()}


def calibrate(sizes: list[int], trace: int, window: float) -> None:
    """Real worker processes under strace (bench/metadata_ops.py: at most `trace` of each size
    traced, the others live and untraced) against the simulator, in the same regime."""
    import metadata_ops as O

    for n in sizes:
        kinds: collections.Counter = collections.Counter()
        real, span = O.per_worker_second(None, n, window, 0, min(n, trace), kinds)
        sim, by_kind = steady_per_worker(n, span)
        print(
            f"{n:>5} workers ({min(n, trace)} traced): strace {real:.4f} calls per worker-second {dict(kinds)}; "
            f"simulator {sim:.4f} {by_kind}; simulator/strace = {sim / real:.3f}",
            flush=True,
        )


def calibrate_chunks(n: int = 16, sizes=((4096, 2048), (1024, 512))) -> None:
    """Calls per chunk: n real workers under strace through a fresh run (bench/metadata_ops.py's
    plan: chunks of 2 records, a fast fake engine; the calls on the run directory, as
    `run_calls` reads them), against the simulator's n workers through the same plan; each
    side's calls at two run sizes, differenced, so what a worker costs whatever the run
    (its start, its last look) drops out."""
    import metadata_ops as O
    import simulation as S

    real, sim = [], []
    for records, chunks in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            run = O.plan(tmp / "real", ROOT, records, chunks)
            traces = tmp / "traces"
            traces.mkdir()
            t0 = time.time()
            for proc in O.start_workers(run, n, None, traces, "run", O.FAKE, timed=True):
                proc.wait()
            wall = time.time() - t0
            # calls on the run directory (relative to its pinned folders, or paths inside it), not
            # an fstat of an open descriptor: what the simulator counts (strace -c would add ~15 a chunk)
            total = sum(sum(O.run_calls(t, run).values()) for t in traces.glob("run*.strace"))
            real.append((json.loads((run / "manifest.json").read_text())["n_chunks"], total, wall))
            (tmp / "sim").mkdir()
            lay = S.sized_layout(tmp / "sim", n, chunks // n, records // chunks, "cal", heartbeat_s=O.HEARTBEAT_S)
            lay.ids = []
            sched = S.Schedule(0, "bench", n, [], skew=[0.0])
            engine = {"step_s": O.FAKE["step_s"], "max_num_seqs": O.FAKE["max_num_seqs"], "tokens": 4}
            s = S.Sim(
                sched, lay, engine=engine, check=False, launcher_poll=False, t_max=10**6, heartbeat_s=O.HEARTBEAT_S
            )
            s.check_end = lambda: None
            run_quiet(s)
            sim.append((lay.n_chunks, sum(s.server.calls.values()), s.t))
    (c1, r1, w1), (c2, r2, w2) = real
    (d1, s1, t1), (d2, s2, t2) = sim
    per_real, per_sim = (r1 - r2) / (c1 - c2), (s1 - s2) / (d1 - d2)
    print(
        f"{n} workers, {c1} and {c2} chunks: strace {r1} and {r2} calls ({w1:.0f} s and {w2:.0f} s), "
        f"{per_real:.2f} a chunk; simulator {s1} and {s2} ({t1:.0f} and {t2:.0f} simulated s), "
        f"{per_sim:.2f} a chunk ({d1} and {d2} chunks); simulator/strace = {per_sim / per_real:.3f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument(
        "--chunks-per-worker",
        type=int,
        default=None,
        help="the plan's chunks_per_worker (default: 16 for calls in steady state, the run default for --balance)",
    )
    ap.add_argument("--records", type=int, default=8, help="records a chunk (the fake engine runs them at once)")
    ap.add_argument("--chunk-s", type=float, default=225.0, help="simulated seconds a chunk takes")
    ap.add_argument("--warm", type=float, default=600.0)
    ap.add_argument(
        "--window",
        type=float,
        default=None,
        help="simulated seconds counted (default 600); --calibrate: real seconds the workers run after the "
        "last has started (default 90)",
    )
    ap.add_argument("--balance", action="store_true", help="whole runs with heavy-tailed lengths: balance, not calls")
    ap.add_argument(
        "--draws",
        type=int,
        default=1,
        help="--balance: runs with this many draws of the output lengths (one draw's balance moves by about 0.01)",
    )
    ap.add_argument(
        "--dispatch",
        action="store_true",
        help="--balance: also a dispatcher of single records at no claim cost, the same draws, in input "
        "order and longest first with the lengths known (comparisons)",
    )
    ap.add_argument("--records-per-worker", type=int, default=2000, help="--balance: the run's records / workers")
    ap.add_argument("--calibrate", action="store_true", help="against real workers under strace (16-1,000)")
    ap.add_argument("--trace", type=int, default=32, help="--calibrate: workers traced of each size (a sample)")
    ap.add_argument("--calibrate-chunks", action="store_true", help="calls per chunk against strace (16 workers)")
    args = ap.parse_args()
    if args.calibrate_chunks:
        calibrate_chunks()
        return
    if args.calibrate:
        calibrate(args.workers, args.trace, args.window or 90.0)
        return
    budget = {1000: 500, 10000: 2000}
    if args.chunks_per_worker is None:
        from hpc_infer.config.schema import RunConfig

        args.chunks_per_worker = RunConfig.chunks_per_worker if args.balance else 16
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            if args.balance:
                import simulation as S

                per_chunk = -(-args.records_per_worker // args.chunks_per_worker)
                lay = S.sized_layout(Path(tmp), n, args.chunks_per_worker, per_chunk, "bench", cap=False)
                lay.ids = []
                sizes = [c["n_records"] for c in json.loads(lay.files["manifest.json"])["chunks"]]
                print(f"{n:>6} workers: {stripes(sizes, n)}", flush=True)
                rows = [balance(lay, n, d) for d in range(args.draws)]
                for d, row in enumerate(rows):
                    print(
                        f"{n:>6} workers, {row['chunks']:>7} chunks, draw {d}: balance {row['balance']} (goal 0.97), "
                        f"makespan {row['makespan_s']} simulated s, {row['published']} published; calls/s: "
                        f"{row['calls_per_s']} over the run, {row['steady_calls_per_s']} in its middle (20-80%), "
                        f"{row['tail_calls_per_s']} in its last fifth ({row['by_kind']}); "
                        f"{row['listings_per_worker']} listings of the run a worker; {row['wall_s']} s to simulate",
                        flush=True,
                    )
                if args.dispatch:
                    for order, lpt in (("input order", False), ("longest first, lengths known", True)):
                        got = [single_record_dispatch(n, sum(sizes), d, lpt) for d in range(args.draws)]
                        print(
                            f"{n:>6} workers, single records to any engine with room, no claim cost, "
                            f"{order}: balance "
                            + ", ".join(f"{b:.4f} (makespan {t:.1f})" for b, t in got)
                            + f", mean {sum(b for b, _ in got) / len(got):.4f}",
                            flush=True,
                        )
                if len(rows) > 1:
                    b = sorted(r["balance"] for r in rows)
                    print(
                        f"{n:>6} workers, {len(rows)} draws: balance mean {sum(b) / len(b):.4f}, "
                        f"least {b[0]}, most {b[-1]} (goal 0.97)",
                        flush=True,
                    )
                continue
            lay = layout(Path(tmp), n, args.chunks_per_worker, args.records)
            row = measure(lay, n, args.records, args.chunk_s, args.warm, args.window or 600.0)
            goal = f" (budget {budget[n]}/s)" if n in budget else ""
            print(
                f"{n:>6} workers, {row['chunks']:>7} chunks, a beat every {row['heartbeat_s']:g}s: "
                f"{row['calls_per_s']:>8.1f} calls/s{goal}, "
                f"{row['per_worker_s']:.4f} per worker-second; {row['by_kind']}; "
                f"{row['chunks_done']} chunks done by t={args.warm + (args.window or 600.0):.0f}s; {row['wall_s']} s to simulate",
                flush=True,
            )


if __name__ == "__main__":
    main()
