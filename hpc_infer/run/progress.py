"""Progress from the run directory: done chunks, heartbeats, job states; the wait loop."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..rundir.claims import live_claims
from ..rundir import RunDir, read_heartbeats, read_json, tail_lines


@dataclass
class Progress:
    n_records: int
    n_chunks: int
    chunks_done: int
    records_done: int  # finished chunks plus records finished inside running chunks
    output_tokens: int  # of finished records, plus tokens generated so far by running ones
    prompt_tokens: int = 0
    workers: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.n_chunks


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
        output_tokens=sum(b.get("output_tokens", 0) + b.get("in_flight_tokens", 0) + b.get("generating_tokens", 0)
                          for b in beats),
        prompt_tokens=sum(b.get("prompt_tokens", 0) + b.get("in_flight_prompt_tokens", 0) for b in beats),
        workers=beats,
    )


def _log_files(run: RunDir, job: str) -> list[str]:
    """A task's stderr/stdout files: submitit's <job>_0_log.err/out, an sbatch script's <job>.err/out."""
    return sorted(str(p) for p in run.logs.glob(f"{job}*") if p.suffix in (".err", ".out"))[:2]


def _last_error_line(logs: list[str]) -> str | None:
    for path in logs:
        if path.endswith(".err"):
            lines = [ln.strip() for ln in tail_lines(path, 50) if ln.strip()]
            if lines:
                return lines[-1][:300]
    return None


def failures(run: RunDir, states: dict[str, str]) -> list[str]:
    """One line per failed worker: its exception (from its heartbeat) and its log files."""
    lines, reported = [], set()
    for b in read_heartbeats(run):
        if b.get("state") == "failed" or b.get("error"):
            reported.add(str(b.get("worker")))
            logs = _log_files(run, str(b["worker"])) if b.get("worker") else []
            lines.append(f"worker {b.get('worker')}: {b.get('error') or 'failed'}"
                         + (f" (log: {', '.join(logs)})" if logs else ""))
    for j, state in states.items():
        if state not in ("COMPLETED", "RUNNING", "PENDING") and j not in reported:
            logs = _log_files(run, j)
            last = _last_error_line(logs)  # died before its heartbeat: e.g. the container did not start
            lines.append(f"task {j}: {state}" + (f": {last}" if last else "")
                         + (f" (log: {', '.join(logs)})" if logs else ""))
    return lines


def wait(run: RunDir, job_states: Callable[[], dict[str, str]], poll_s: float = 2.0, show: bool = True,
         log_every_s: float = 30.0, lease_s: float = 600.0) -> Progress:
    """Block until every chunk is done, or no job is left that could finish one: none of
    ours, and no live claim of a worker from an earlier launch (a relaunch while the first
    launch's workers still run waits for them instead of calling the run failed).

    On a terminal: a tqdm bar. In a log (no TTY): one progress line every `log_every_s`.
    """
    from tqdm import tqdm

    from ..cluster.submit import TERMINAL

    manifest = read_json(run.manifest)
    from ..worker.engine import POOLING_TASKS

    try:
        pooling = read_json(run.worker_spec)["model"].get("task") in POOLING_TASKS
    except (OSError, ValueError, KeyError):
        pooling = False
    p = snapshot(run, manifest)
    start_tokens, start_prompt, start_records, t0 = p.output_tokens, p.prompt_tokens, p.records_done, time.time()
    tty = sys.stderr.isatty()
    bar = tqdm(total=p.n_records, initial=p.records_done, unit="rec", desc=run.root.name, disable=not (show and tty),
               file=sys.stderr, dynamic_ncols=True)
    last_log = 0.0
    while True:
        p = snapshot(run, manifest)
        states = job_states()
        failed = sum(1 for s in states.values() if s in TERMINAL and s != "COMPLETED")
        running = sum(1 for s in states.values() if s == "RUNNING")
        elapsed = max(time.time() - t0, 1e-9)
        rec_rate = (p.records_done - start_records) / elapsed
        eta = f"{(p.n_records - p.records_done) / rec_rate:,.0f}s" if rec_rate > 0 else "--"  # never nan
        if pooling:  # embed/score/classify generate nothing: records and input tokens per second
            postfix = (f"rec/s={rec_rate:,.1f} in_tok/s={(p.prompt_tokens - start_prompt) / elapsed:,.0f} "
                       f"ETA={eta} running={running} failed={failed}")
        else:
            postfix = (f"tok/s={(p.output_tokens - start_tokens) / elapsed:,.0f} ETA={eta} running={running} "
                       f"failed={failed}")
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(max(0, p.records_done - bar.n))
        if show and not tty and (time.time() - last_log >= log_every_s or p.complete):
            last_log = time.time()
            print(f"[hpc_infer] {run.root.name}: {p.records_done}/{p.n_records} records, "
                  f"{p.chunks_done}/{p.n_chunks} chunks, {elapsed:,.0f}s, {postfix}", file=sys.stderr, flush=True)
        if p.complete:
            break
        if not states or all(s in TERMINAL for s in states.values()):
            p = snapshot(run, manifest)  # a last look: the final rename may have just landed
            if not p.complete and not live_claims(run, lease_s):
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
        eta = f"{(p.n_records - p.records_done) / rate:,.0f} s" if rate > 0 else "unknown until a record finishes"
        lines.append(f"  {len(live)} live worker{'s' * (len(live) != 1)}   {tok:,.0f} tok/s   ETA {eta}")
    if states:
        lines.append("  tasks:")
        for job_id, state in sorted(states.items()):
            lines.append(f"    {job_id:>14}  {state}")
    for b in p.workers:
        counts = f"chunks_done={b.get('chunks_done', 0)}  records={b.get('records_done', 0)}"
        state = b.get("state", "?")
        if state in ("finished", "failed"):
            end = b.get("finished_at") or b.get("t", now)
            ran = end - b.get("started", end)
            tail = f"ran {ran:,.0f}s, ended {now - end:,.0f}s ago"
            if b.get("error"):
                tail += f"  error: {b['error']}"
            lines.append(f"  worker {b['worker']:>14}  {state:9} {counts}  {tail}")
        else:
            age = now - b.get("t", now)
            chunks = ",".join(map(str, (b.get("in_flight") or {}).keys())) or "-"
            stale = "  (no heartbeat for long: the worker may have died)" if age > 3 * 60 else ""
            alone = (f"  running chunk {b['isolating']} alone (its workers died with it: finding the record that "
                     f"kills the engine)") if b.get("isolating") is not None else ""
            lines.append(f"  worker {b['worker']:>14}  {state:9} chunks={chunks}  {counts}  "
                         f"last heartbeat {age:.0f}s ago{stale}{alone}")
    missing = sorted(set(range(p.n_chunks)) - run.done_chunks())
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        lines.append(f"  chunks not done: {shown}")
        from ..rundir import isolate

        deaths = {c: isolate.deaths(run, c) for c in missing[:1000] if isolate.attempts_path(run, c).exists()}
        if any(deaths.values()):
            lines.append("  workers died with these chunks in their batch: " + ", ".join(
                f"{c} ({n}x)" for c, n in sorted(deaths.items()) if n) + " (a chunk that died cluster.max_attempts "
                "times is run alone and bisected)")
    return "\n".join(lines)
