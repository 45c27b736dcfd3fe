"""The worker: claim a chunk, put its records into an engine, publish what finishes, repeat.

Runs inside the job (often inside the cluster's vLLM image), so it imports only the
standard library, the run-directory protocol (hpc_infer/rundir) and, lazily, its engine.
Everything it needs comes from `worker.json` in the run directory, never from a pickle or
command line. The engine is anything with the small protocol of worker/protocol.py:
vLLM in this process, running servers over HTTP, or the fake engine of the tests.

    python -m hpc_infer.worker RUN_DIR [--worker-id ID]

What stops it, and what it leaves:
- every chunk published (or nothing left to claim): exit 0;
- SIGTERM/SIGINT (scancel, `hpc-infer cancel`, a time limit's end) and SIGUSR2 (the
  scheduler's warning before a time limit or a preemption, in a rendered script): it
  stops at its next step, takes its engine attempts back (a kill is not a poison record:
  rundir/isolate.py), releases its claims, writes a last heartbeat saying why, and exits
  (75 after SIGUSR2: the rendered script then requeues the task). Under submitit, its
  own SIGUSR2 handler requeues and exits; the same release runs on the way out;
- its engine dies (a poison record, the OOM killer): its attempts stay counted, the
  next holder runs the chunk alone and bisects it (rundir/isolate.py);
- its heartbeat cannot reach the run directory: it claims nothing new, finishes what it
  holds if it can, and leaves the rest to others once its leases run out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..host.procs import scheduler_job_id
from ..rundir import (
    RunDir,
    claims,
    clock,
    encode_chunk_output,
    faults,
    isolate,
    notices,
    publish_chunk_output,
    read_chunk_source,
    set_permissions,
    tail,
)
from ..rundir.claimer import Claimer
from .finish import FinishEstimate
from .heartbeat import Heartbeat

EX_REQUEUE = 75  # EX_TEMPFAIL: stopped by the scheduler's warning; the rendered script requeues the task
CHECK_BACKUPS_S = 15.0  # how often a worker looks whether another copy of a chunk it runs was
# published: at least this, and 1.5 heartbeats (a run of 10,000 workers beats every 100 s)


def default_worker_id() -> str:
    """The scheduler's job id (Slurm array task, submitit local job), else host and pid."""
    return scheduler_job_id()


def default_rank() -> tuple[int, int]:
    """(this worker's index, how many were started with it): the array task's, else (0, 1)."""
    env = os.environ
    try:
        return int(env.get("SLURM_ARRAY_TASK_ID", 0)), int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    except ValueError:
        return 0, 1


class RunDeleted(Exception):
    """The run directory vanished (deleted by its owner): nothing to write to."""

    def __init__(self, root: Path):
        super().__init__(f"{root} was deleted while this worker ran; stopping without writing")


class HeartbeatLost(RuntimeError):
    """No beat reached the run directory for a whole lease while the worker held nothing:
    it never claimed anything and fails (a worker that did nothing is not 'finished')."""


DONE = -1.0  # step(): the worker has nothing more to do


class Stopped(Exception):
    """A signal asked the worker to stop (scancel, cancel, a time limit, a preemption)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@dataclass
class Chunk:
    id: int
    size: int
    started: float
    backup: bool = False  # a backup copy of a chunk another worker holds
    rows: list = field(default_factory=list)
    source: Any = None  # rundir.ChunkSource: where an error record's input line came from
    records: list = field(default_factory=list)
    part: tuple[int, int] | None = None  # a suspect chunk runs one range at a time (isolate.py)
    fed: tuple[int, int] | None = None  # the range whose attempt is recorded and in the engine now
    output_tokens: int = 0  # the token counts of `rows`: the beat's in-flight figures, kept as
    prompt_tokens: int = 0  # rows come, not summed over every row at every engine step

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.output_tokens += row["output_tokens"]
        self.prompt_tokens += row["prompt_tokens"]

    def set_rows(self, rows: list) -> None:
        self.rows, self.output_tokens, self.prompt_tokens = [], 0, 0
        for row in rows:
            self.add(row)


class Pacing:
    """Straggler pacing (bench/balance.py simulates it): a worker slower than STRAGGLER x the
    live median holds only `share` of a full batch, so less of the run waits on it at the
    end, and leaves the last TAIL_SHARE of the estimated work to the others while a worker
    that is not a straggler is live."""

    def __init__(self, run: RunDir, worker_id: str, heartbeat_s: float, est: dict[int, int]):
        self.run, self.worker_id = run, worker_id
        # a look every 4 minutes at 8 heartbeats (about 12 calls): a small, flat cost per worker,
        # 0.05 calls a second (bench/metadata_ops.py); the rate itself spans 12 beats
        self.every, self.fresh_s = max(240.0, 24 * heartbeat_s), 3 * heartbeat_s + 10
        self.next_at = clock.monotonic() + self.every
        self.share, self.leave_tail = 1.0, False
        self.est, self.total = est, max(1, sum(est.values()))

    def update(self, claimer: Claimer) -> dict | None:
        if clock.monotonic() < self.next_at:
            return None
        self.next_at = clock.monotonic() + self.every
        p = tail.pace(self.run, self.worker_id, fresh_s=self.fresh_s)
        if p is None:
            self.share, self.leave_tail = 1.0, False
            return None
        straggler = p.ratio < tail.STRAGGLER
        self.share = p.ratio if straggler else 1.0
        self.leave_tail = (  # the work left unclaimed: summed only for a straggler (a pass over the chunks)
            straggler
            and p.others_running
            and sum(self.est.get(cid, 0) for cid in claimer.unclaimed()) < tail.TAIL_SHARE * self.total
        )
        return {"pace": round(p.ratio, 3), "straggler": straggler}


class Worker:
    """One worker process over one engine; `work()` returns its counters.

    Another chunk is claimed and fed whenever the engine has spare batch capacity (fewer
    unfinished requests than its max_num_seqs), so the batch never drains at a chunk
    boundary; a worker holds at most `max_chunks_in_flight` claims (cluster setting,
    default 16), so it cannot hoard a small run's chunks.
    """

    def __init__(
        self,
        run_dir: str | Path,
        worker_id: str | None = None,
        max_chunks: int | None = None,
        rank: int | None = None,
        of: int | None = None,
        run: RunDir | None = None,
        owner: claims.Owner | None = None,
        engine: Any = None,
    ):
        self.run = run or open_run(Path(run_dir))
        self.spec = spec = self.run.read_json("worker.json")
        set_permissions(spec.get("permissions"))
        manifest = self.run.read_json("manifest.json")
        self.planned, self.sizes, est = chunk_tables(manifest)
        for key, value in (spec.get("env") or {}).items():
            os.environ.setdefault(key, str(value))
        os.environ["HF_HUB_OFFLINE"] = "1"  # workers never download; the launcher resolved the model
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        self.owner = owner or claims.Owner.current(worker_id or default_worker_id())
        self.lease_s = float(spec.get("lease_s", 600))
        heartbeat_s = float(spec.get("heartbeat_s", 10))
        self.hb = Heartbeat(self.run, self.owner, heartbeat_s, self.lease_s)
        self.finish = FinishEstimate(window_s=max(30.0, 3 * heartbeat_s))
        self._finish_at, self._finish_n = float("-inf"), 0  # when the estimate was last made, on how many lengths
        if rank is None or of is None:
            rank, of = default_rank()
        self.claimer = Claimer(self.run, int(manifest["n_chunks"]), self.owner, self.lease_s, rank, of)
        self.pacing = Pacing(self.run, self.owner.worker_id, heartbeat_s, est)
        self.engine: Any = engine
        self._engine_given = engine is not None
        self.inflight: dict[int, Chunk] = {}
        self.max_chunks, self.claimed, self.exhausted = max_chunks, 0, False
        self.max_in_flight = int(spec.get("max_chunks_in_flight", 16))
        self.backups_left = int(spec.get("max_backups", 2))
        self.max_attempts = int(spec.get("max_attempts", 2))
        self.too_long = spec.get("too_long") or {}
        self.sampling, self.seed = run_sampling(spec)
        self.isolating: int | None = None  # the suspect chunk this worker runs alone: nothing else is claimed meanwhile
        self.suspects_waiting = False  # suspect chunks left for when nothing else is in flight
        self.stop_signal: int | None = None
        self._backups_seen_at = float("-inf")
        self._backup_look_at = float("-inf")
        self._backup_misses = 0  # looks in a row that found no straggler's chunk
        self._unhealthy_since: float | None = None

    # --- the engine -------------------------------------------------------------------------
    def ensure_engine(self) -> Any:
        if self.engine is None or self.hb.state["state"] != "running":
            self.hb.update(state="loading")
            t0 = clock.monotonic()
            if self.engine is None:
                self.engine = make_engine(self.spec, self.owner.worker_id)
            self.hb.update(
                engine_start_s=round(clock.monotonic() - t0, 3),
                state="running",
                vllm_port=os.environ.get("VLLM_PORT"),  # TP/PP workers: their own range
                compile_cache=getattr(self.engine, "compile_cache", None),
            )
        return self.engine

    def feed(self, chunk: Chunk, lo: int, hi: int) -> None:
        """Records [lo, hi) of a chunk into the engine, the attempt recorded first: if the
        engine's process dies now, the next holder knows this range was in its batch."""
        eng = self.ensure_engine()
        isolate.record_attempt(self.run, chunk.id, (lo, hi), self.owner.worker_id, alone=chunk.id == self.isolating)
        chunk.fed = (lo, hi)
        for r in chunk.records[lo:hi]:
            faults.point("record", r.get("id"))
        eng.add(chunk.records[lo:hi], self.sampling, self.seed)

    # --- chunks ----------------------------------------------------------------------------
    def is_suspect(self, cid: int) -> bool:
        return isolate.suspect(self.run, cid, self.max_attempts)

    def start(self, cid: int, backup: bool = False) -> Chunk:
        """Read a chunk's records (checked against the plan) and put it in flight."""
        source = read_chunk_source(self.run.fs, self.planned[cid], self.spec["input"])
        records = source.records
        for r in records:
            r["worker"], r["chunk"] = self.owner.worker_id, cid
            fit = self.too_long.get(str(r["index"]))
            if fit:  # found at plan time (models/fit.py): truncated, or failed without the engine
                r["too_long"] = fit
        chunk = self.inflight[cid] = Chunk(
            cid, len(records), clock.now(), backup=backup, source=source, records=records
        )
        self._show_in_flight()
        return chunk

    def advance(self, chunk: Chunk) -> bool:
        """A suspect chunk's next range into the engine; True once every record is in a part
        (its rows then hold the whole chunk, ready to publish)."""
        while True:
            step = isolate.next_step(
                (0, chunk.size),
                isolate.attempts(self.run, chunk.id)[1],
                set(isolate.done_parts(self.run, chunk.id)),
                self.max_attempts,
            )
            if step is None:
                chunk.set_rows(isolate.read_parts(self.run, chunk.id))
                chunk.part = None
                return True
            what, (lo, hi) = step
            if what == "poison":
                from .protocol import error_result

                row = error_result(chunk.records[lo], isolate.poison_reason(self.max_attempts), 500)
                row.update(chunk.source.origin(lo))
                isolate.save_part(self.run, chunk.id, (lo, hi), [row])
                continue
            chunk.set_rows([])
            chunk.part = (lo, hi)
            self.feed(chunk, lo, hi)
            return False

    def publish(self, chunk: Chunk) -> None:
        """Write a chunk's output (the first complete copy wins), drop its claim, count it. A
        run directory deleted under the worker is noticed by its heartbeat, or here when the
        output cannot be created (no folder is brought back piecemeal)."""
        rows = sorted(chunk.rows, key=lambda r: r["index"])
        indices = [r["index"] for r in rows]
        if indices != sorted(r["index"] for r in chunk.records):
            raise RuntimeError(f"chunk {chunk.id}: engine returned records {indices}, not the chunk's own")
        try:
            published = publish_chunk_output(
                self.run.fs,
                self.run.out_name(chunk.id),
                chunk.id,
                encode_chunk_output(
                    chunk.id,
                    rows,
                    worker=self.owner.worker_id,
                    started=round(chunk.started, 3),
                    finished=round(clock.now(), 3),
                    **({"backup": True} if chunk.backup else {}),
                ),
            )
        except FileNotFoundError:
            if self.run_gone():
                raise RunDeleted(self.run.root) from None
            raise
        if not chunk.backup:
            claims.release(self.run, chunk.id, self.owner)
        if self.isolating == chunk.id:
            isolate.forget(self.run, chunk.id)
            self.isolating = None
            self.hb.update(isolating=None)
        del self.inflight[chunk.id]
        self.claimer.published()  # its next look lists the run: the last publisher finds it done
        s = self.hb.state
        if not published:  # another copy finished first: ours is discarded, nothing counted twice
            self.hb.update(abandoned=s.get("abandoned", 0) + 1)
            return
        self.hb.update(
            chunks_done=s["chunks_done"] + 1,
            records_done=s["records_done"] + len(rows),
            prompt_tokens=s["prompt_tokens"] + sum(r["prompt_tokens"] for r in rows),
            output_tokens=s["output_tokens"] + sum(r["output_tokens"] for r in rows),
            last_chunk_s=round(clock.now() - chunk.started, 3),
        )

    def run_gone(self) -> bool:
        """The pinned run folder itself was removed (a folder made again under its name is
        another run: this worker writes nothing there)."""
        st = self.run.fs.stat()
        return st is None or st.nlink == 0

    def _show_in_flight(self) -> None:
        self.hb.update(
            in_flight={c: len(k.rows) for c, k in self.inflight.items()},
            held=[c for c, k in self.inflight.items() if not k.backup],
            in_flight_tokens=sum(k.output_tokens for k in self.inflight.values()),
            in_flight_prompt_tokens=sum(k.prompt_tokens for k in self.inflight.values()),
        )

    # --- one turn of the loop --------------------------------------------------------------
    def fill(self) -> None:
        """Claim and feed chunks while the engine has room."""
        while (
            not self.exhausted
            and not self.pacing.leave_tail
            and self.isolating is None
            and not self.suspects_waiting
            and len(self.inflight) < self.max_in_flight
            and self.hb.healthy
            and self.stop_signal is None
            and (
                self.engine is None
                or self.engine.unfinished < max(1, int(self.engine.max_num_seqs * self.pacing.share))
            )
        ):
            if self.max_chunks is not None and self.claimed >= self.max_chunks:
                self.exhausted = True
                return
            deferred: list[int] = []
            verdicts: dict[int, bool] = {}

            def skip(c: int) -> bool:  # a suspect runs alone: left for later while others are in flight
                if self.inflight:
                    verdicts[c] = self.is_suspect(c)
                    if verdicts[c]:
                        deferred.append(c)
                        return True
                return False

            cid = self.claimer.next(skip)
            if cid is None:
                self.suspects_waiting = bool(deferred)
                self.exhausted = not deferred
                return
            faults.point("claimed", self.run.fs.where(self.run.claim_name(cid)))
            chunk = self.start(cid)
            self.claimed += 1
            if verdicts[cid] if cid in verdicts else self.is_suspect(cid):
                self.isolating = cid
                self.hb.update(isolating=cid)
                if self.advance(chunk):  # every record already in a part (a holder died publishing)
                    self.publish(chunk)
            else:
                self.feed(chunk, 0, chunk.size)

    def try_backup(self) -> None:
        """Nothing left to claim and idle: re-execute the tail (MapReduce's backup tasks); the
        first complete output wins (rundir/chunks.py: publish_chunk_output). A look reads a
        sample of heartbeats, so an idle worker looks as often as it looks for backups of its
        own chunks (every CHECK_BACKUPS_S or 1.5 beats), not at every idle turn, and after a
        look that found nothing half as often each time (at most 8x): at the tail every
        worker is idle (bench/metadata_sim.py --balance at 1,000 workers: 260 heartbeat
        reads a second over the run before the first, 500 a second in its last fifth before
        the second). Its first look is at once."""
        every = max(CHECK_BACKUPS_S, 1.5 * self.hb.interval_s) * 2 ** min(self._backup_misses, 3)
        if clock.monotonic() - self._backup_look_at < every:
            return
        self._backup_look_at = clock.monotonic()
        for _ in range(3):
            cid = tail.backup_candidate(self.run, self.sizes, self.pacing.fresh_s)
            if cid is None or isolate.suspect(self.run, cid, self.max_attempts):
                self._backup_misses += 1  # nothing to back up: look half as often (up to 8x apart)
                return  # a suspect's holder runs it alone, slowly, on purpose
            if tail.try_backup(self.run, cid, self.owner) and not self.run.chunk_done(cid):
                self.backups_left -= 1
                self.hb.update(backups=self.hb.state.get("backups", 0) + 1)
                chunk = self.start(cid, backup=True)
                self.feed(chunk, 0, self.sizes[cid])
                return

    def take_finished(self, finished: list[dict]) -> None:
        for row in finished:
            chunk = self.inflight[row["chunk"]]
            if row.get("error"):  # refused by the engine: the record's error, with its input line
                # (its place in the chunk by its index: a prefix-grouped chunk is not one range)
                row.update(chunk.source.origin(chunk.source.position(row["index"])))
            else:  # a sample's length (n > 1: the longest of the record's samples, each a sequence)
                lengths = [o.get("num_tokens") for o in row.get("outputs") or [] if isinstance(o, dict)]
                self.finish.finished(
                    max((n for n in lengths if isinstance(n, int)), default=row.get("output_tokens") or 0)
                )
            chunk.add(row)
        for chunk in [self.inflight[c] for c in {r["chunk"] for r in finished}]:
            if chunk.part is not None and len(chunk.rows) == chunk.part[1] - chunk.part[0]:
                if not self.run.fs.exists("manifest.json"):
                    raise RunDeleted(self.run.root)
                isolate.save_part(self.run, chunk.id, chunk.part, chunk.rows)
                chunk.fed = None  # written: nothing of this chunk is in the engine now
                if not self.advance(chunk):
                    continue
            if chunk.part is None and len(chunk.rows) == chunk.size:
                self.publish(chunk)
        if finished:
            self._show_in_flight()

    def drop_published_elsewhere(self) -> None:
        """Stop running chunks another copy of which was published (a backup raced ours). Only
        chunks with a backup marker can have two copies: a listing of the (few) markers every
        CHECK_BACKUPS_S (or 1.5 heartbeats), then a stat of those chunks' outputs alone."""
        if clock.monotonic() - self._backups_seen_at < max(CHECK_BACKUPS_S, 1.5 * self.hb.interval_s):
            return
        self._backups_seen_at = clock.monotonic()
        backed = tail.backed_up(self.run)
        for cid in [c for c in self.inflight if c in backed and self.run.chunk_done(c)]:
            self.engine.abort(cid)
            if self.isolating == cid:
                self.isolating = None
            if not self.inflight[cid].backup:
                claims.release(self.run, cid, self.owner)
            del self.inflight[cid]
            self.claimer.published()
            self.hb.update(abandoned=self.hb.state.get("abandoned", 0) + 1)

    def loop(self) -> None:
        while True:
            wait = self.step()
            if wait == DONE:
                return
            while wait > 0 and self.stop_signal is None:  # a signal is acted on within a second
                clock.sleep(min(wait, 1.0))
                wait -= 1.0

    def step(self) -> float:
        """One turn of the worker's state machine (STATES below): DONE, or the seconds to
        wait before the next turn (0: at once)."""
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal)
        if self.engine is not None and self.spec.get("straggler_pacing", True):
            said = self.pacing.update(self.claimer)
            if said:
                self.hb.update(**said)
        if self.suspects_waiting and not self.inflight:
            self.suspects_waiting = False  # nothing else in flight now: a suspect chunk can run alone
        self.fill()
        if not self.inflight and self.pacing.leave_tail:
            return DONE  # the others finish the tail; a straggler's backup copy would not win
        if (
            not self.inflight
            and self.exhausted
            and self.backups_left > 0
            and self.engine is not None
            and self.stop_signal is None
            and self.hb.healthy
        ):
            self.try_backup()
        if not self.inflight:
            return self.idle()
        self._unhealthy_since = None
        if self.hb.run_deleted:  # the heartbeat thread looks every interval; before a write, we look too
            raise RunDeleted(self.run.root)
        faults.point("step")
        batch = min(self.engine.unfinished, self.engine.max_num_seqs)
        self.take_finished([r for r in self.engine.step() if r["chunk"] in self.inflight])  # abandoned: dropped
        self.drop_published_elsewhere()
        generating = int(getattr(self.engine, "generating_tokens", 0))
        if generating != self.hb.state.get("generating_tokens"):
            self.hb.update(generating_tokens=generating)
        self.show_finish(batch)
        return 0.0

    def show_finish(self, batch: int) -> None:
        """Once a beat: how long this engine's running records should take to finish
        (worker/finish.py), the end of the launcher's ETA, with when it was estimated."""
        now = clock.monotonic()
        self.finish.stepped(now, batch)
        if not hasattr(self.engine, "running_tokens"):
            return
        n = self.finish.n_finished
        if not n:
            return  # no length seen yet: no estimate to make (nor the running records to list each step)
        if (
            now - self._finish_at < self.hb.interval_s
            and n < 2 * self._finish_n
            and self.hb.state.get("finish_s") is not None
        ):
            return  # again once a beat, or sooner while the lengths seen double (the run's start)
        running = self.engine.running_tokens()
        left = self.finish.seconds_left(running, now)
        if left is not None:  # until there is one, it is looked for at each step
            self._finish_at, self._finish_n = now, n
        self.hb.update(
            running=len(running), finish_s=None if left is None else round(left, 1), finish_at=round(clock.now(), 3)
        )

    def idle(self) -> float:
        """Nothing in flight. Beats that do not reach the run directory: wait for them (claim
        nothing), failing after a whole lease, unless the run is done meanwhile (a `done`
        notice: nothing is left to claim, so no beat is needed to end). Chunks claimed by
        others and not done: wait until the first of their holders' leases could run out,
        then look again (a dead holder's chunk is taken over by a live worker, with no
        relaunch). Else DONE."""
        if self.hb.run_deleted:
            raise RunDeleted(self.run.root)
        if self.hb.state.get("running"):  # nothing left running here: nothing of the ETA's end either
            self.hb.update(running=0, finish_s=0.0, finish_at=round(clock.now(), 3))
        if not self.hb.healthy and self.stop_signal is None:
            if notices.done_posted(self.run):
                return DONE
            now = clock.monotonic()
            self._unhealthy_since = now if self._unhealthy_since is None else self._unhealthy_since
            if now - self._unhealthy_since > self.lease_s:
                raise HeartbeatLost(
                    f"no heartbeat reached {self.run.root} for {self.lease_s:g}s (cluster.lease_s); this "
                    f"worker claimed nothing. Check the run directory's file system from this node"
                )
            return self.hb.interval_s
        self._unhealthy_since = None
        if self.max_chunks is not None and self.claimed >= self.max_chunks:
            return DONE
        wait = self.claimer.idle_wait(self.hb.interval_s)
        if wait is None:
            return DONE
        self.exhausted = False
        return wait

    # --- start and stop --------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum  # acted on at the next step: never mid-write

    def _handle_signals(self) -> dict:
        """SIGTERM and SIGINT always; SIGUSR2 unless submitit's own handler (checkpoint and
        requeue) has it. Returns the handlers to put back."""
        wanted = [signal.SIGTERM, signal.SIGINT]
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            wanted.append(signal.SIGUSR2)
        saved = {}
        for sig in wanted:
            try:
                saved[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (a test's thread): no handlers
                break
        return saved

    def _release_all(self, engine_died: bool) -> None:
        """Take back what this worker held: its attempts (unless its engine died with them:
        those count toward finding a poison record) and its claims."""
        freed = False
        for cid, chunk in self.inflight.items():
            try:
                if chunk.fed and not engine_died:
                    isolate.record_attempt(
                        self.run, cid, chunk.fed, self.owner.worker_id, alone=cid == self.isolating, released=True
                    )
                if not chunk.backup:
                    claims.release(self.run, cid, self.owner)
                    freed = True
            except OSError:
                pass  # the lease runs out instead
        if freed:
            try:
                notices.post_freed(self.run)  # idle workers list again (rundir/claimer.py)
            except OSError:
                pass  # they find it when their sampled claims are gone

    def work(self) -> dict:
        """Run until the worker ends (STATES): its counters."""
        saved = self._handle_signals()
        try:
            self.begin()
            while True:
                wait = self.turn()
                if wait == DONE:
                    return self.result
                while wait > 0 and self.stop_signal is None:  # a signal is acted on within a second
                    clock.sleep(min(wait, 1.0))
                    wait -= 1.0
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def begin(self, thread: bool = True) -> None:
        """The first heartbeat (an earlier process's counters carried on), then beats from a
        thread (`thread=False`: the caller beats, as the protocol simulator does)."""
        self.hb.start(thread)
        self.result: dict = {}

    def turn(self) -> float:
        """One step, and the way out when it ends the worker: DONE once its last heartbeat
        says how it ended (self.result), else the seconds to wait before the next turn."""
        try:
            wait = self.step()
        except RunDeleted as e:
            self._release_all(engine_died=False)
            self.hb._stop.set()
            print(f"worker {self.owner.worker_id}: {e}", file=sys.stderr)
            self.result = dict(self.hb.state, state="run deleted")
            return DONE
        except Stopped as e:
            self._release_all(engine_died=False)
            self.hb.stop("stopped", stopped_because=str(e))
            print(f"worker {self.owner.worker_id}: {e}; claims released, attempts taken back", file=sys.stderr)
            self.result = dict(self.hb.state, signal=e.signum)
            return DONE
        except SystemExit:  # submitit's own SIGUSR2 handler: it requeued the task and exits now
            self._release_all(engine_died=False)
            self.hb.stop(
                "stopped",
                stopped_because="requeued by submitit (the scheduler's warning: a time limit or a preemption)",
            )
            raise
        except BaseException as e:
            self._release_all(engine_died=isolate.engine_died(e))
            # the user sees this line in `launch` and `status`, not only "FAILED"
            self.hb.update(error=(f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:500])
            self.hb.stop("failed")
            raise
        if wait == DONE:
            self.hb.stop("finished")
            self.result = dict(self.hb.state)
        return wait


# The worker's states and what moves it between them (step() and turn() walk this table;
# tests/simulation.py drives them one turn at a time):
#
#   state       what it does                                  -> next
#   starting    first heartbeat (an earlier process's          -> claiming; waiting_beat if it failed
#               counters carried on)
#   waiting_beat beats do not reach the run dir: claims        -> claiming once one does; finished on a
#               nothing                                           `done` notice; failed after a lease
#                                                                 (HeartbeatLost)
#   claiming    claims chunks while the engine has room        -> running; idle when none is free
#   running     engine steps; finished records collected;      -> claiming (room again), publishing
#               a suspect chunk bisected alone                    (a chunk whole), idle (nothing in flight)
#   publishing  output linked once, claim released             -> claiming / running
#   idle        backups of stragglers' chunks; else waits      -> claiming (a chunk came free or a
#               until the first holder's lease could run out      holder's lease ran out); finished
#               (idle_wait)                                       (every chunk done)
#   any         SIGTERM/SIGINT/SIGUSR2 -> stopped (claims released, attempts taken back); the run
#               folder removed -> run deleted; an exception -> failed (attempts kept if the engine
#               died: a poison record)
STATES = ("starting", "waiting_beat", "claiming", "running", "publishing", "idle", "finished", "stopped", "failed")


_TABLES: dict[int, tuple] = {}


def chunk_tables(manifest: dict) -> tuple[dict, dict, dict]:
    """(chunk by id, records by id, estimated tokens by id) of a manifest, read-only; workers
    given the same manifest object share them (the protocol simulator runs thousands)."""
    found = _TABLES.get(id(manifest))
    if found is None or found[0] is not manifest:
        planned = {c["id"]: c for c in manifest["chunks"]}
        sizes = {cid: int(c["n_records"]) for cid, c in planned.items()}
        est = {cid: int(c.get("est_tokens", 1)) for cid, c in planned.items()}
        _TABLES.clear()
        found = _TABLES[id(manifest)] = (manifest, planned, sizes, est)
    return found[1], found[2], found[3]


def make_engine(spec: dict, worker_id: str = "") -> Any:
    """The engine worker.json asks for: the fake engine when HPC_INFER_FAKE_ENGINE is set
    (tests, benches), the running servers of `cluster.endpoint`, else vLLM in this process."""
    from . import fake_engine

    conf = fake_engine.settings()
    if conf is not None:
        seqs = ((spec.get("model") or {}).get("engine_kwargs") or {}).get("max_num_seqs")
        if seqs:  # the one engine setting the fake has, given as vLLM's (tune's grid changes its rate)
            conf = dict(conf, max_num_seqs=int(seqs))
        return fake_engine.FakeEngine(conf, worker_id)
    if spec.get("endpoint"):  # batch through running servers: no model load here
        from .http_engine import HttpEngine

        return HttpEngine(spec["endpoint"], spec["model"])
    from .vllm_engine import VllmEngine

    return VllmEngine.shared(spec["model"])


def open_run(root: Path) -> RunDir:
    """The run directory as a worker opens it: pinned, judged as the caller's own (a worker
    acts on it), and checked against the identity its job was given (HPC_INFER_RUN_PIN): a
    folder swapped in under the same path since launch is refused by name."""
    from ..rundir import trust
    from ..rundir.fsio import PIN_ENV, Pin

    fs = trust.open_dir(root, "worker", need=trust.OWN)
    pin = Pin.decode(os.environ.get(PIN_ENV, ""))
    if pin is not None:
        trust.check_pin(fs, pin, "worker")
    return RunDir(root, fs)


def run_sampling(spec: dict) -> tuple[dict | None, int | None]:
    """(sampling, seed) every record starts from. OpenAI batch lines (data.batch_defaults=
    server, the default) start from nothing: what a body leaves out takes vLLM's server
    defaults, as in `vllm run-batch`; the run's sampling group and seed do not apply."""
    if spec["input"].get("format") == "openai_batch" and spec.get("batch_defaults", "server") == "server":
        return None, None
    return spec.get("sampling") or {}, spec.get("seed")


def run_worker(
    run_dir: str | Path,
    worker_id: str | None = None,
    max_chunks: int | None = None,
    rank: int | None = None,
    of: int | None = None,
) -> dict:
    """Process chunks until none is left to claim (or a signal). Returns this worker's counters."""
    return Worker(run_dir, worker_id, max_chunks, rank, of).work()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--max-chunks", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="this worker's index among those started with it")
    parser.add_argument("--of", type=int, default=None, help="how many were started with it")
    args = parser.parse_args(argv)
    state = run_worker(args.run_dir, args.worker_id, args.max_chunks, args.rank, args.of)
    print(f"worker {state['worker']}: {state['chunks_done']} chunks, {state['records_done']} records", file=sys.stderr)
    if state.get("signal") == signal.SIGUSR2:
        return EX_REQUEUE
    if state.get("signal") is not None:
        return 128 + int(state["signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
