"""Progress from the run directory, one estimator for `launch` and `status`; the wait loop.

What counts as done is what is finished: records of published chunks, and records that
finished inside chunks still in flight (the holders' heartbeats); their output tokens
likewise. Tokens still being generated are shown as such, never counted as done (they
made the total overshoot the final one). A rate is the sum over the *live* workers of
each one's rate over its recent window (its heartbeat's `recent` samples, its own
clock), so engine starts, a day between launches and dead workers of an earlier launch
never water it down. The ETA has two parts: the records no engine has started, at that
rate, then the longest of those running now, as each live worker estimates it
(worker/finish.py: the lengths it has seen finish, its step time). A rate alone
misses the end of a run with heavy-tailed lengths, the last records being the long ones
(the default run's 16 records: 28 s shown, 160 s taken). Engines that give no estimate
(HTTP): records left / rate. Unknown while the rate is 0 and records wait to start.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..log import printable
from ..rundir import RunDir, read_heartbeats, tail_lines
from ..rundir.beats import rate, read_beat, seconds_ran
from ..rundir.claims import live_claims
from ..rundir.notices import FS_CACHE_S, done_posted
from ..rundir.lease import fs_now


@dataclass
class Progress:
    n_records: int
    n_chunks: int
    chunks_done: int
    records_done: int  # records of published chunks, plus records finished inside chunks in flight
    output_tokens: int  # output tokens of those records
    prompt_tokens: int = 0
    generating_tokens: int = 0  # being generated now (shown, not done)
    records_per_s: float = 0.0  # live workers, recent window
    tokens_per_s: float = 0.0
    live_workers: int = 0
    workers: list[dict] = field(default_factory=list)
    running: int = 0  # records the live workers' engines are generating
    finish_s: float | None = None  # until the longest of those finishes (None: no worker estimates it)

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.n_chunks

    @property
    def eta_s(self) -> float | None:
        left = self.n_records - self.records_done
        if left <= 0:
            return 0.0
        if self.finish_s is None:
            return left / self.records_per_s if self.records_per_s > 0 else None
        waiting = max(0, left - self.running)  # not started (a dead worker's records start again)
        if waiting and self.records_per_s <= 0:
            return None
        return (waiting / self.records_per_s if waiting else 0.0) + self.finish_s


def _token_rate(beat: dict) -> float | None:
    recent = beat.get("recent") or []
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
        return (recent[-1][2] - recent[0][2]) / (recent[-1][0] - recent[0][0])
    return None


def _finish_left(beat: dict, age: float) -> float | None:
    """Seconds until this worker's running records should all be done: its estimate less
    the time since it was made (on its own clock, then the beat's age on the reader's)."""
    est, at = beat.get("finish_s"), beat.get("finish_at")
    if not isinstance(est, (int, float)) or not isinstance(at, (int, float)):
        return None
    return max(0.0, est - max(0.0, float(beat.get("t", at)) - at) - age)


def poll_interval(workers: int) -> float:
    """The launcher's poll: every 2 s for a few workers, up to every 30 s for a thousand (each
    poll lists out/ and reads every heartbeat: bench/metadata_ops.py)."""
    return min(30.0, max(2.0, workers / 20))


class DoneTracker:
    """The published chunks, learnt incrementally: one listing of out/ a look, and each new
    output's trailer checked once (a published output is never replaced), instead of a stat
    of every output at every poll."""

    def __init__(self, run: RunDir):
        self.run, self.done = run, set()

    def update(self) -> set[int]:
        from ..rundir.chunks import chunk_done
        from ..rundir.layout import _ids_in

        for cid, name in _ids_in(self.run.fs, "out", ".jsonl"):
            if cid not in self.done and chunk_done(self.run.fs, f"out/{name}", cid):
                self.done.add(cid)
        return self.done


class BeatTracker:
    """The workers' heartbeats, read in turns: at most READS_PER_S a second of polling (the
    least recently read first, a new worker's at once), the others as last read. At 10,000
    workers a poll that read every beat would cost the file server 330 opens a second; this
    costs 20, and a beat shown is at most workers / 20 seconds old. A beat's age is its age
    when read plus the time since."""

    READS_PER_S = 20.0

    def __init__(self, run: RunDir):
        self.run, self.seen, self.last = run, {}, None  # name -> (beat, age when read, read at)

    def update(self, now: float) -> list[tuple[dict, float]]:
        names = sorted(n for n in self.run.fs.listdir("heartbeats") if n.endswith(".json") and not n.startswith("."))
        for gone in self.seen.keys() - set(names):
            del self.seen[gone]
        budget = len(names) if self.last is None else max(32, int(self.READS_PER_S * (now - self.last)))
        self.last = now
        for n in sorted(names, key=lambda n: self.seen[n][2] if n in self.seen else -1.0)[:budget]:
            found = read_beat(self.run.fs, f"heartbeats/{n}", now)
            if found:
                self.seen[n] = (found[0], found[1], now)
        return [(b, age + now - at) for b, age, at in self.seen.values()]


def snapshot(
    run: RunDir,
    manifest: dict | None = None,
    fresh_s: float = 60.0,
    tracker: DoneTracker | None = None,
    beats_seen: BeatTracker | None = None,
) -> Progress:
    """Where a run is: published chunks, and the workers' heartbeats (all read now, or in
    turns through `beats_seen`, as the launcher's poll does)."""
    manifest = manifest or run.read_json("manifest.json")
    sizes = {c["id"]: c["n_records"] for c in manifest["chunks"]}
    done = (tracker.update() if tracker else run.done_chunks()) & sizes.keys()
    now = fs_now(run.fs, "heartbeats")
    found = (beats_seen or BeatTracker(run)).update(now)  # a fresh tracker's first look reads every beat
    beats = [b for b, _ in found]
    in_chunk: dict[int, int] = {}
    for b in beats:  # the furthest any holder got in each chunk not yet published
        for c, n in (b.get("in_flight") or {}).items():
            if int(c) not in done:
                in_chunk[int(c)] = max(in_chunk.get(int(c), 0), int(n))
    live_found = [(b, age) for b, age in found if b.get("state") == "running" and age < fresh_s]
    live = [b for b, _ in live_found]
    ends = [e for e in (_finish_left(b, age) for b, age in live_found) if e is not None]
    return Progress(
        n_records=manifest["n_records"],
        n_chunks=manifest["n_chunks"],
        chunks_done=len(done),
        records_done=sum(sizes[c] for c in done) + sum(in_chunk.values()),
        output_tokens=sum(b.get("output_tokens", 0) + b.get("in_flight_tokens", 0) for b in beats),
        prompt_tokens=sum(b.get("prompt_tokens", 0) + b.get("in_flight_prompt_tokens", 0) for b in beats),
        generating_tokens=sum(b.get("generating_tokens", 0) for b in live),
        records_per_s=sum(max(rate(b) or 0.0, 0.0) for b in live),
        tokens_per_s=sum(max(_token_rate(b) or 0.0, 0.0) for b in live),
        live_workers=len(live),
        workers=beats,
        running=sum(int(b.get("running") or 0) for b in live),
        finish_s=max(ends) if ends else None,
    )


def fresh_s_of(run: RunDir) -> float:
    """How recent a heartbeat must be to count its worker as live: 3 beats and some slack."""
    try:
        return 3 * float(run.read_json("worker.json").get("heartbeat_s", 10)) + 10
    except (OSError, ValueError):
        return 40.0


def eta_text(p: Progress) -> str:
    eta = p.eta_s
    return "unknown until a record finishes" if eta is None else f"{eta:,.0f}s"


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
            lines.append(
                f"worker {b.get('worker')}: {b.get('error') or 'failed'}"
                + (f" (log: {', '.join(logs)})" if logs else "")
            )
    for j, state in states.items():
        if state not in ("COMPLETED", "RUNNING", "PENDING") and j not in reported:
            logs = _log_files(run, j)
            last = _last_error_line(logs)  # died before its heartbeat: e.g. the container did not start
            lines.append(
                f"task {j}: {state}" + (f": {last}" if last else "") + (f" (log: {', '.join(logs)})" if logs else "")
            )
    return lines


def wait(
    run: RunDir,
    job_states: Callable[[], dict[str, str]],
    poll_s: float = 2.0,
    show: bool = True,
    log_every_s: float = 30.0,
    lease_s: float = 600.0,
) -> Progress:
    """Block until every chunk is done, or no job is left that could finish one: none of
    ours, and no live claim of a worker from an earlier launch (a relaunch while the first
    launch's workers still run waits for them instead of calling the run failed).

    On a terminal: a tqdm bar. In a log (no TTY): one progress line every `log_every_s`.
    The bar, the line and `hpc-infer status` show the same estimate (snapshot).
    """
    from tqdm import tqdm

    from ..cluster.submit import TERMINAL
    from ..worker.protocol import POOLING_TASKS

    manifest = run.read_json("manifest.json")
    try:
        pooling = run.read_json("worker.json")["model"].get("task") in POOLING_TASKS
    except (OSError, ValueError, KeyError):
        pooling = False
    fresh_s = fresh_s_of(run)
    tracker, beats_seen = DoneTracker(run), BeatTracker(run)
    p = snapshot(run, manifest, fresh_s, tracker, beats_seen)
    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    bar = tqdm(
        total=p.n_records,
        initial=p.records_done,
        unit="rec",
        desc=run.root.name,
        disable=not (show and tty),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    last_log = float("-inf")
    ended_at: float | None = None  # when every job was first seen ended with the run not complete
    while True:
        p = snapshot(run, manifest, fresh_s, tracker, beats_seen)
        states = job_states()
        failed = sum(1 for s in states.values() if s in TERMINAL and s != "COMPLETED")
        running = sum(1 for s in states.values() if s == "RUNNING")
        eta = p.eta_s
        eta = "--" if eta is None else f"{eta:,.0f}s"  # never nan
        if pooling:  # embed/score/classify generate nothing: records per second
            postfix = f"rec/s={p.records_per_s:,.1f} ETA={eta} running={running} failed={failed}"
        else:
            postfix = f"tok/s={p.tokens_per_s:,.0f} ETA={eta} running={running} failed={failed}"
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(max(0, p.records_done - bar.n))
        if show and not tty and (time.monotonic() - last_log >= log_every_s or p.complete):
            last_log = time.monotonic()
            print(
                f"[hpc_infer] {run.root.name}: {p.records_done}/{p.n_records} records, "
                f"{p.chunks_done}/{p.n_chunks} chunks, {time.monotonic() - t0:,.0f}s, {postfix}",
                file=sys.stderr,
                flush=True,
            )
        if p.complete:
            break
        if not states or all(s in TERMINAL for s in states.values()):
            p = snapshot(
                run, manifest, fresh_s, tracker, beats_seen
            )  # a last look: the final rename may have just landed
            if not p.complete and not live_claims(run, lease_s):
                ended_at = ended_at or time.monotonic()
                # a worker's listing found every output (the `done` notice): this view lags, a
                # file server's attribute and entry caches (tests/test_sharedfs.py: 3 s) hiding
                # the last outputs from this client; look again rather than resubmit, for as
                # long as such a cache can last (a damaged output, named but not done, ends it)
                if not (done_posted(run) and time.monotonic() - ended_at < FS_CACHE_S):
                    break
        time.sleep(max(poll_s, poll_interval(len(states))))
    bar.close()
    return p


def _lost(beat: dict, age: float, fresh_s: float) -> str:
    """Why a worker whose last beat says it runs does not ("" when it may): its process on
    this host is gone, or it missed three beats."""
    from ..host.procs import identify

    pid, start = beat.get("pid"), beat.get("pid_start")
    if beat.get("host") == socket.gethostname() and isinstance(pid, int) and isinstance(start, int):
        if identify(pid, start) is None:
            return "  (not running: its process is gone)"
    if age > fresh_s:
        return f"  (not running: no heartbeat for {age:.0f}s, over 3 beats)"
    return ""


def describe(run: RunDir, states: dict[str, str]) -> str:
    """The `hpc-infer status` text: per task state, chunks done, tokens/s, ETA."""
    manifest = run.read_json("manifest.json")
    fresh_s = fresh_s_of(run)
    p = snapshot(run, manifest, fresh_s)
    now = time.time()
    lines = [
        f"run {run.root}",
        f"  chunks {p.chunks_done}/{p.n_chunks}   records {p.records_done}/{p.n_records}   "
        f"output tokens {p.output_tokens:,}"
        + (f" (+{p.generating_tokens:,} generating)" if p.generating_tokens else ""),
    ]
    if p.live_workers:
        lines.append(
            f"  {p.live_workers} live worker{'s' * (p.live_workers != 1)}   {p.tokens_per_s:,.0f} tok/s   "
            f"{p.records_per_s:,.1f} records/s   ETA {eta_text(p)}"
        )
    if states:
        lines.append("  tasks:")
        for job_id, state in sorted(states.items()):
            lines.append(f"    {job_id:>14}  {state}")
    for b in p.workers:
        counts = f"chunks_done={b.get('chunks_done', 0)}  records={b.get('records_done', 0)}"
        state = b.get("state", "?")
        if state in ("finished", "failed", "stopped"):
            end = b.get("finished_at") or b.get("t", now)
            ran = seconds_ran(b)
            tail = f"ran {ran:,.0f}s, ended {now - end:,.0f}s ago"
            if b.get("error"):
                tail += f"  error: {b['error']}"
            if b.get("stopped_because"):
                tail += f"  ({b['stopped_because']})"
            lines.append(f"  worker {b['worker']:>14}  {state:9} {counts}  {tail}")
        else:
            age = now - b.get("t", now)
            chunks = ",".join(map(str, (b.get("in_flight") or {}).keys())) or "-"
            lost = _lost(b, age, fresh_s)
            if lost:  # its last beat said running; it is not (killed outright, its node gone)
                state, chunks = "lost", "-"
            alone = (
                (
                    f"  running chunk {b['isolating']} alone (its workers died with it: finding the record that "
                    f"kills the engine)"
                )
                if b.get("isolating") is not None and not lost
                else ""
            )
            lines.append(
                f"  worker {b['worker']:>14}  {state:9} chunks={chunks}  {counts}  "
                f"last heartbeat {age:.0f}s ago{lost}{alone}"
            )
    missing = sorted(set(range(p.n_chunks)) - run.done_chunks())
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        lines.append(f"  chunks not done: {shown}")
        from ..rundir import isolate
        from ..rundir.claims import live_holders

        try:
            lease_s = float(run.read_json("worker.json").get("lease_s", 600))
        except (OSError, ValueError):
            lease_s = 600.0
        holders = live_holders(run, lease_s)  # a live holder's attempt is running, not a death
        running: dict[int, set[str]] = {}  # and so is a live backup copy's (not the claim's holder)
        for b in p.workers:
            if b.get("state") == "running" and not _lost(b, now - b.get("t", now), fresh_s):
                for c in b.get("in_flight") or {}:
                    running.setdefault(int(c), set()).add(str(b["worker"]))
        deaths = {
            c: isolate.deaths(run, c, exclude=sorted(running.get(c, set()) | ({holders[c]} if c in holders else set())))
            for c in missing[:1000]
            if run.fs.exists(isolate.attempts_path(c))
        }
        if any(deaths.values()):
            lines.append(
                "  workers died with these chunks in their batch: "
                + ", ".join(f"{c} ({n}x)" for c, n in sorted(deaths.items()) if n)
                + " (a chunk that died cluster.max_attempts "
                "times is run alone and bisected)"
            )
    return "\n".join(printable(line) for line in lines)  # nothing from a run moves the terminal
