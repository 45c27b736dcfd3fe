"""Makespan efficiency at 1,000 workers: our dynamic claiming vs. static and interleaved slices.

A discrete-event simulation of W workers, each a continuously batching vLLM engine:
a decode step with b running sequences takes `a + c*b` seconds, a prefill costs `p`
seconds per prompt token, an engine start costs `load_s`, and each chunk claim costs
`claim_s` (file-system round trips). These constants come from the real engine:
`--measure` times vLLM (the CPU build and SmolLM2 here; a GPU machine where one is lent)
and writes bench/engine_model.json, which the simulation then reads. Output lengths
are log-normal (reasoning traces: long tail, clipped at max_tokens); the planner cannot
know them, so every scheme sees the same estimate (prompt chars + max_tokens).

Schemes (what other tools do, and ours):
  static       equal-count contiguous slices, one per worker (hand-rolled arrays, vec-inf)
  interleaved  record i to worker i mod W (strided sharding)
  shards/task  K shards per worker as separate array tasks, each loading the model
  ours         one engine per worker, chunks cut by plan.make_chunks (guided, shrinking),
               claimed dynamically, a new chunk enqueued while the batch has room and
               fewer than max_chunks_in_flight (16) are unfinished: worker.py's policy;
               then with backup copies of the tail, and with straggler pacing too (the
               default: see run_backups)

Two efficiencies per scheme: balance = total busy worker-time / (W x makespan), the
issue's "total work / (workers x finish time)", which a scheme improves by keeping
every worker busy to the end; and vs. ideal = (load_s + all work at a full batch / W) /
makespan, stricter, since it also counts half-empty batches and repeated model loads
as waste. A worker slowed by a factor f (a slower GPU, a noisy neighbour) does 1/f of a
normal worker's share in the ideal.

    .venv/bin/python bench/balance.py [--workers 1000] [--records-per-worker 1000]
    .venv/bin/python bench/balance.py --measure     # re-measure the engine constants
    .venv/bin/python bench/balance.py --workers 10000 --default-only --scenario iid   # the default alone
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL_FILE = ROOT / "bench" / "engine_model.json"


@dataclass
class EngineModel:
    a: float  # seconds per decode step, fixed part
    c: float  # seconds per decode step per running sequence
    p: float  # seconds per prefill token
    load_s: float  # engine start (model load, warm-up)
    claim_s: float  # one chunk claim + input read + atomic output write
    max_num_seqs: int
    source: str = ""

    def step(self, b: int) -> float:
        return self.a + self.c * b


class Worker:
    """One engine: running sequences (finish step heap), a waiting queue, in-flight chunks."""

    def __init__(self, m: EngineModel, start: float, slow: float = 1.0):
        self.m, self.t, self.steps, self.slow = m, start, 0, slow
        self.running: list[int] = []  # decode step at which each running sequence finishes
        self.waiting: deque = deque()  # (prompt_tokens, output_tokens, chunk)
        self.left: dict[int, int] = {}  # chunk -> records not finished yet
        self.finishing: list[tuple[int, int]] = []  # (finish step, chunk)
        self.completed: list[tuple[int, float]] = []  # (chunk, time) as chunks finish here

    def enqueue(self, records: list[tuple[int, int]], chunk: int) -> None:
        self.waiting.extend((pt, ot, chunk) for pt, ot in records)
        self.left[chunk] = len(records)

    @property
    def unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    def advance(self) -> bool:
        """Admit what fits, then run to the next sequence finish. False when idle."""
        m = self.m
        while self.waiting and len(self.running) < m.max_num_seqs:
            pt, ot, chunk = self.waiting.popleft()
            self.t += m.p * pt * self.slow
            heapq.heappush(self.running, self.steps + max(1, ot))
            heapq.heappush(self.finishing, (self.steps + max(1, ot), chunk))
        if not self.running:
            return False
        nxt = self.running[0]
        self.t += (nxt - self.steps) * m.step(len(self.running)) * self.slow
        self.steps = nxt
        while self.running and self.running[0] == nxt:
            heapq.heappop(self.running)
        while self.finishing and self.finishing[0][0] == nxt:
            _, chunk = heapq.heappop(self.finishing)
            if chunk not in self.left:
                continue  # aborted
            self.left[chunk] -= 1
            if not self.left[chunk]:
                del self.left[chunk]
                self.completed.append((chunk, self.t))
        return True

    def abort(self, chunk: int) -> None:
        """Drop a chunk's remaining sequences (another copy finished first)."""
        if chunk not in self.left:
            return
        del self.left[chunk]
        self.waiting = deque(x for x in self.waiting if x[2] != chunk)
        keep = [(f, c) for f, c in self.finishing if c != chunk]
        heapq.heapify(keep)
        self.finishing = keep
        self.running = [f for f, _ in keep]
        heapq.heapify(self.running)


def run_dynamic(
    m: EngineModel,
    slow: list[float],
    chunks: list[list[tuple[int, int]]],
    *,
    load_per_chunk: bool,
    max_in_flight: int = 16,
) -> list[float]:
    """Workers claim chunks in id order. With load_per_chunk, each chunk is its own array
    task: a fresh engine (load_s), drained before the next task starts."""
    queue = deque(enumerate(chunks))
    ws = [Worker(m, 0.0 if load_per_chunk else m.load_s, f) for f in slow]
    heap = [(w.t, i) for i, w in enumerate(ws)]
    heapq.heapify(heap)
    ends = [0.0] * len(ws)
    while heap:
        _, i = heapq.heappop(heap)
        w = ws[i]
        if load_per_chunk:
            if w.unfinished == 0 and queue:
                cid, recs = queue.popleft()
                w.t += m.load_s + m.claim_s
                w.enqueue(recs, cid)
        else:
            while queue and len(w.left) < max_in_flight and w.unfinished < m.max_num_seqs:
                cid, recs = queue.popleft()
                w.t += m.claim_s
                w.enqueue(recs, cid)
        if w.advance() or queue:
            heapq.heappush(heap, (w.t, i))
        else:
            ends[i] = w.t
    return ends


STRAGGLER = 0.75  # rundir/tail.py: a worker under this fraction of the median rate is a straggler
TAIL_SHARE = 1 / 6  # rundir/tail.py: a straggler leaves the last sixth of the estimated work to the others


def run_backups(
    m: EngineModel,
    slow: list[float],
    chunks: list[list[tuple[int, int]]],
    *,
    max_in_flight: int = 16,
    max_backups: int = 2,
    pacing: bool = True,
    tail_share: float = TAIL_SHARE,
    est: list[int] | None = None,
) -> tuple[list[float], float]:
    """Ours plus the tail policy of worker/worker.py.

    Pacing: a straggler (rate under STRAGGLER x the median) holds at most its rate / the
    median of a full batch, and claims nothing once less than `tail_share` of the
    estimated work (`est`: each chunk's estimate, as in the manifest) is unclaimed, so
    little of the run is left on slow engines at the end. (The worker
    estimates the rates from a sample of heartbeats every few heartbeats; here they are
    exact.) Backups: once nothing is left to claim, an idle worker that is not a straggler
    re-executes a straggler's live chunk with the longest expected time left (one backup
    per chunk, at most `max_backups` per worker); the first copy to finish wins and the
    other is aborted. Other workers' progress is read at their own simulated clock, which
    may be slightly ahead: a small bias against backups. Returns worker end times and the
    worker-time spent on copies that lost (the backups' extra cost)."""
    queue = deque(enumerate(chunks))
    est = est or [len(c) for c in chunks]
    unclaimed, est_total = float(sum(est)), float(sum(est))
    ws = [Worker(m, m.load_s, f) for f in slow]
    heap = [(w.t, i) for i, w in enumerate(ws)]
    heapq.heapify(heap)
    ends = [0.0] * len(ws)
    holders: dict[int, dict[int, float]] = {}  # chunk -> {worker: time its copy started}
    done: set[int] = set()
    backed: set[int] = set()
    left = [max_backups] * len(ws)
    wasted = 0.0
    median = sorted(1 / x.slow for x in ws)[len(ws) // 2]
    share = [min(1.0, (1 / w.slow) / median) for w in ws]
    straggler = [pacing and s < STRAGGLER for s in share]
    while heap:
        _, i = heapq.heappop(heap)
        w = ws[i]
        cap = max(1, int(m.max_num_seqs * share[i])) if straggler[i] else m.max_num_seqs
        leave_tail = straggler[i] and unclaimed < tail_share * est_total
        while queue and not leave_tail and len(w.left) < max_in_flight and w.unfinished < cap:
            cid, recs = queue.popleft()
            unclaimed -= est[cid]
            w.t += m.claim_s
            w.enqueue(recs, cid)
            holders.setdefault(cid, {})[i] = w.t
        busy = w.advance()
        for cid, t in w.completed:
            if cid in done:
                continue
            done.add(cid)
            for j, started in holders.pop(cid, {}).items():
                if j != i:
                    ws[j].abort(cid)
                    wasted += max(0.0, t - started)
                    if not ws[j].left:  # that copy was all it had: it stops when the winner finishes
                        ws[j].t = t
        w.completed.clear()
        if not busy and not queue and left[i] > 0 and not straggler[i]:
            # expected time left: records left x the holder's slowness (the worker estimates the
            # latter from the holder's heartbeat rate); only a straggler's chunks
            live = [
                (max(ws[j].left.get(c, 0) * ws[j].slow for j in hs), c)
                for c, hs in holders.items()
                if c not in done
                and c not in backed
                and i not in hs
                and any(1 / ws[j].slow < STRAGGLER * median for j in hs)
            ]
            if live:
                _, cid = max(live)
                backed.add(cid)
                left[i] -= 1
                w.t += m.claim_s
                w.enqueue(chunks[cid], cid)
                holders[cid][i] = w.t
                busy = True
        if busy or (queue and not leave_tail):
            heapq.heappush(heap, (w.t, i))
        else:
            ends[i] = w.t
    return ends, wasted


def run_static(m: EngineModel, slow: list[float], slices: list[list[tuple[int, int]]]) -> list[float]:
    ends = []
    for recs, f in zip(slices, slow):
        w = Worker(m, m.load_s + m.claim_s, f)
        w.enqueue(recs, 0)
        while w.advance():
            pass
        ends.append(w.t)
    return ends


def workload(
    n: int, seed: int, max_tokens: int, out_median: float, out_sigma: float, drift: float = 0.0
) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens): log-normal prompts (median 150) and outputs (heavy
    tail). `drift` makes outputs grow along the input (a data set sorted by difficulty):
    the median at the end is exp(drift) times the median at the start."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        mu = math.log(out_median) + drift * (i / n - 0.5)
        recs.append(
            (max(8, int(rng.lognormvariate(5.0, 0.7))), min(max_tokens, max(1, int(rng.lognormvariate(mu, out_sigma)))))
        )
    return recs


def ideal(m: EngineModel, recs: list[tuple[int, int]], workers: int) -> float:
    full = m.step(m.max_num_seqs) / m.max_num_seqs  # seconds per output token at a full batch
    work = sum(m.p * pt + full * ot for pt, ot in recs)
    return m.load_s + work / workers


def measure(out: Path) -> EngineModel:
    """Time the real engine: decode steps at several batch sizes, prefill, engine start."""
    import os

    os.environ.update(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "HF_HUB_OFFLINE": "1",
        }
    )
    from hpc_infer.rundir.claims import Owner, release, try_claim
    from hpc_infer.models.cpu_model import ensure_smollm2
    from hpc_infer.rundir import RunDir, encode_chunk_output, read_jsonl, write_atomic, write_jsonl

    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ensure_smollm2()), dtype="bfloat16", max_model_len=2048, seed=0, max_num_seqs=128)
    load_s = time.perf_counter() - t0
    steps = 32

    def gen(batch: int, prompt_words: int, max_tokens: int) -> float:
        prompts = [f"Item {i}: " + "word " * prompt_words for i in range(batch)]
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    gen(4, 8, 4)  # warm-up
    prefill = {b: gen(b, 8, 1) for b in (1, 8, 32, 128)}
    decode = {b: (gen(b, 8, steps + 1) - prefill[b]) / steps for b in (1, 8, 32, 128)}
    xs, ys = list(decode), list(decode.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = max(1e-4, my - c * mx)
    long_prefill = gen(16, 400, 1) - gen(16, 8, 1)
    p = max(1e-7, long_prefill / (16 * 392 * 1.3))  # ~1.3 tokens per "word "
    with tempfile.TemporaryDirectory() as tmp:  # claim + read + write, 50 records
        run = RunDir(Path(tmp))
        run.make()
        rows = [
            {"id": str(i), "index": i, "prompt": "x" * 400, "text": "y" * 2000, "output_tokens": 500} for i in range(50)
        ]
        write_jsonl(run.input_copy, rows)
        owner = Owner.current("bench")
        t = time.perf_counter()
        for _ in range(20):
            try_claim(run, 0, owner)
            read_jsonl(run.input_copy)
            write_atomic(run.out_path(0), encode_chunk_output(0, rows))
            release(run, 0, owner)
        claim_s = (time.perf_counter() - t) / 20
    m = EngineModel(
        a=a,
        c=c,
        p=p,
        load_s=load_s,
        claim_s=claim_s,
        max_num_seqs=128,
        source=f"measured {time.strftime('%Y-%m-%d')} by `bench/balance.py --measure`: vLLM "
        f"{vllm.__version__}, SmolLM2-135M bf16, this machine's CPU; "
        f"decode s/step by batch { ({b: round(v, 4) for b, v in decode.items()}) }",
    )
    out.write_text(json.dumps(m.__dict__, indent=1) + "\n")
    return m


SCENARIOS = {
    "i.i.d. lengths": dict(drift=0.0, slow_fraction=0.0),
    "lengths grow along the input": dict(drift=1.5, slow_fraction=0.0),
    "5% of workers 2x slower": dict(drift=0.0, slow_fraction=0.05),
}
SHORT = dict(zip(("iid", "drift", "slow"), SCENARIOS))  # --scenario's names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--records-per-worker", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out-median", type=float, default=300, help="median output tokens (log-normal)")
    ap.add_argument("--out-sigma", type=float, default=1.0, help="log-normal sigma of output tokens (tail)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="time the real engine first (writes engine_model.json)")
    ap.add_argument(
        "--start-s",
        type=float,
        default=None,
        help="price an engine start at this many seconds (e.g. bench/engine_start.py's cold start) "
        "instead of engine_model.json's load_s",
    )
    ap.add_argument(
        "--default-only",
        action="store_true",
        help="run our default scheme alone (10,000 workers: the other schemes' cells take an hour)",
    )
    ap.add_argument(
        "--scenario",
        action="append",
        choices=list(SHORT),
        help="only these scenarios (iid, drift, slow); default: all",
    )
    args = ap.parse_args()

    from hpc_infer.config.schema import RunConfig
    from hpc_infer.run.plan import make_chunks

    m = measure(MODEL_FILE) if args.measure else EngineModel(**json.loads(MODEL_FILE.read_text()))
    if args.start_s is not None:
        m.load_s = args.start_s
    W = args.workers
    print(
        f"engine: step = {m.a * 1e3:.2f} ms + {m.c * 1e3:.3f} ms x batch (max {m.max_num_seqs}), "
        f"prefill {m.p * 1e6:.1f} us/token, load {m.load_s:.1f} s, claim {m.claim_s * 1e3:.1f} ms"
    )
    print(f"        {m.source}")
    print(
        f"{W} workers x {args.records_per_worker} records, output tokens log-normal (median {args.out_median:.0f}, "
        f"sigma {args.out_sigma}, clipped at {args.max_tokens}); ideal makespan "
        f"{ideal(m, workload(W * args.records_per_worker, args.seed, args.max_tokens, args.out_median, args.out_sigma), W):.0f} s"
    )
    schemes = [
        "static slices",
        "interleaved",
        "4 shards/worker, load per task",
        "ours, chunks_per_worker=4",
        "ours, 16",
        "ours, 64",
        "ours, 64 + backups",
        "ours, 64 + pacing + backups (default)",
    ]
    # Engine starts per scheme, each priced at the measured start: what a scheme pays before
    # its first token, whatever the balance (the shards/task scheme loads once per task).
    starts = [W, W, 4 * W, W, W, W, W, W]
    if args.default_only:
        schemes, starts = schemes[-1:], starts[-1:]
    print(
        f"{'engine starts x ' + format(m.load_s, '.1f') + ' s':<30}"
        + "".join(f"{f'{n:,} = {n * m.load_s / 3600:,.1f} worker-h':>40}" for n in starts)
    )
    print(f"{'balance / vs. ideal':<30}" + "".join(f"{name:>40}" for name in schemes))
    for scenario, sc in SCENARIOS.items():
        if args.scenario and scenario not in {SHORT[k] for k in args.scenario}:
            continue
        rng = random.Random(args.seed + 1)
        recs = workload(
            W * args.records_per_worker, args.seed, args.max_tokens, args.out_median, args.out_sigma, sc["drift"]
        )
        slow = [2.0 if rng.random() < sc["slow_fraction"] else 1.0 for _ in range(W)]
        n = len(recs)
        best = m.load_s + (ideal(m, recs, W) - m.load_s) * W / sum(1 / f for f in slow)
        est = [pt + args.max_tokens for pt, _ in recs]  # what the planner knows: prompt size + max_tokens
        spans = []
        if not args.default_only:
            spans += [
                run_static(m, slow, [recs[n * i // W : n * (i + 1) // W] for i in range(W)]),
                run_static(m, slow, [recs[i::W] for i in range(W)]),
                run_dynamic(
                    m,
                    slow,
                    [recs[n * i // (4 * W) : n * (i + 1) // (4 * W)] for i in range(4 * W)],
                    load_per_chunk=True,
                ),
            ]
            for cpw in (4, 16, 64):
                chunks = [[recs[i] for i in r] for r in make_chunks(est, W, cpw)]
                spans.append(run_dynamic(m, slow, chunks, load_per_chunk=False))
        ranges = make_chunks(est, W, RunConfig.chunks_per_worker)  # the default (64)
        chunks = [[recs[i] for i in r] for r in ranges]
        chunk_est = [sum(est[i] for i in r) for r in ranges]
        if not args.default_only:
            spans.append(run_backups(m, slow, chunks, pacing=False)[0])
        ends, wasted = run_backups(m, slow, chunks, est=chunk_est)
        spans.append(ends)
        cells = [f"{sum(e) / (W * max(e)):.3f} / {best / max(e):.3f} ({max(e):6.0f} s)" for e in spans]
        print(f"{scenario:<30}" + "".join(f"{c:>40}" for c in cells), flush=True)
        print(
            f"{'':<30}default: extra worker-time on losing backup copies {wasted:,.0f} s = "
            f"{100 * wasted / sum(ends):.2f}% of all worker-time",
            flush=True,
        )


if __name__ == "__main__":
    main()
