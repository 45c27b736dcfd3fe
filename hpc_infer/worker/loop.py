"""The worker: claim a chunk, generate, write its output atomically, repeat.

Runs inside the job (often inside the cluster's vLLM image), so it imports only the
standard library, its run-directory siblings and, lazily, vLLM. Everything it needs
comes from `worker.json` in the run directory, never from a pickle or command line.

    python -m hpc_infer.worker RUN_DIR [--worker-id ID]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..host import procs
from ..rundir import (RunDir, claims, encode_chunk_output, faults, isolate, publish_chunk_output, read_chunk_source,
                      read_json, set_permissions, write_json)


def default_worker_id() -> str:
    """The scheduler's job id (Slurm array task, submitit local job), else host and pid."""
    env = os.environ
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        return env["SUBMITIT_LOCAL_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "SLURM_JOB_ID" in env:
        return env["SLURM_JOB_ID"]
    return f"{socket.gethostname()}-{os.getpid()}"


class Heartbeat:
    """Refreshes the claims in flight and writes heartbeats/W.json from a thread."""

    def __init__(self, run: RunDir, owner: claims.Owner, interval_s: float):
        self.run, self.owner, self.interval_s = run, owner, interval_s
        self.state: dict[str, Any] = {
            "worker": owner.worker_id,
            "host": owner.host,
            "pid": owner.pid,
            "pid_start": procs.this_process().start,  # with pid: exactly this process, for `cancel`
            "python": sys.executable,  # inside a container: the image's interpreter
            "started": time.time(),
            "state": "starting",
            "in_flight": {},  # chunk id -> records finished so far
            "chunks_done": 0,
            "records_done": 0,
            "prompt_tokens": 0,
            "output_tokens": 0,
            "in_flight_tokens": 0,  # output tokens of finished records in chunks not yet written
            "generating_tokens": 0,  # tokens of requests still generating (an estimate, for progress)
            "engine_start_s": None,
            # Whether a token reached this job (never its value): `status` can tell users.
            "hf_token_present": bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")),
        }
        self.run_deleted = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def update(self, **kw: Any) -> None:
        with self._lock:
            self.state.update(kw)

    def beat(self) -> None:
        with self._lock:
            state = dict(self.state, in_flight=dict(self.state["in_flight"]), t=time.time())
        for cid in state["in_flight"]:
            claims.refresh(self.run, int(cid))
        write_json(self.run.heartbeat_path(self.owner.worker_id), state)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.run.manifest.exists():
                self.run_deleted = True  # the main loop stops at its next step
                return
            try:
                self.beat()
            except OSError:
                pass

    def stop(self, final_state: str) -> None:
        self._stop.set()
        self.update(state=final_state, in_flight={}, in_flight_tokens=0, generating_tokens=0, finished_at=time.time())
        self.beat()


def next_chunk(run: RunDir, n_chunks: int, owner: claims.Owner, lease_s: float,
               skip=lambda cid: False) -> int | None:
    """Claim the first free chunk (chunks are ordered largest first), else a stale one;
    never one that `skip` says to leave for now (a suspect chunk while others are in flight)."""
    done = run.done_chunks()
    claimed = run.claimed_chunks()
    for cid in range(n_chunks):
        if cid not in done and cid not in claimed and not skip(cid) and claims.try_claim(run, cid, owner):
            if not run.chunk_done(cid):
                return cid
            claims.release(run, cid, owner)
    for cid in sorted(claimed - done):
        if not skip(cid) and claims.is_stale(run.claim_path(cid), lease_s) and claims.take_over(run, cid, owner,
                                                                                                 lease_s):
            if not run.chunk_done(cid):
                return cid
            claims.release(run, cid, owner)
    return None


class RunDeleted(Exception):
    """The run directory vanished (deleted by its owner): nothing to write to."""

    def __init__(self, root: Path):
        super().__init__(f"{root} was deleted while this worker ran; stopping without writing")


@dataclass
class _Chunk:
    id: int
    size: int
    started: float
    backup: bool = False  # a backup copy of a chunk another worker holds
    rows: list = field(default_factory=list)
    source: Any = None  # rundir.ChunkSource: where an error record's input line came from
    records: list = field(default_factory=list)
    part: tuple[int, int] | None = None  # a suspect chunk runs one range at a time (isolate.py)
    fed: tuple[int, int] | None = None  # the range whose attempt is recorded and in the engine now


def _claim_backup(run: RunDir, owner: claims.Owner, sizes: dict[int, int], lease_s: float,
                  max_attempts: int) -> int | None:
    """The tail chunk most likely to finish last, marked as backed up by us (one backup per
    chunk); never a suspect chunk (isolate.py): its holder runs it alone, slowly, on purpose."""
    for _ in range(3):
        cid = claims.backup_candidate(run, sizes, lease_s)
        if cid is None or isolate.suspect(run, cid, max_attempts):
            return None
        if claims.try_backup(run, cid, owner) and not run.chunk_done(cid):
            return cid
    return None


def run_worker(run_dir: str | Path, worker_id: str | None = None, max_chunks: int | None = None) -> dict:
    """Process chunks until none is left to claim. Returns this worker's counters.

    Another chunk is claimed and enqueued whenever the engine has spare batch
    capacity (fewer unfinished requests than vLLM's max_num_seqs), so the batch never
    drains at a chunk boundary; a worker holds at most `max_chunks_in_flight` claims
    (cluster setting, default 16), so it cannot hoard a small run's chunks.
    """
    run = RunDir(Path(run_dir))
    spec = read_json(run.worker_spec)
    set_permissions(spec.get("permissions"))
    manifest = read_json(run.manifest)
    n_chunks = int(manifest["n_chunks"])
    planned = {c["id"]: c for c in manifest["chunks"]}
    for key, value in (spec.get("env") or {}).items():
        os.environ.setdefault(key, str(value))
    os.environ["HF_HUB_OFFLINE"] = "1"  # workers never download; the launcher resolved the model
    os.environ["TRANSFORMERS_OFFLINE"] = "1"

    owner = claims.Owner.current(worker_id or default_worker_id())
    lease_s = float(spec.get("lease_s", 600))
    hb = Heartbeat(run, owner, float(spec.get("heartbeat_s", 10)))
    hb.start()
    engine = None
    inflight: dict[int, _Chunk] = {}
    claimed = 0
    exhausted = False
    max_in_flight = int(spec.get("max_chunks_in_flight", 16))
    backups_left = int(spec.get("max_backups", 2))
    sizes = {cid: int(c["n_records"]) for cid, c in planned.items()}
    last_done_check = 0.0
    # Straggler pacing (bench/balance.py simulates it): a worker slower than STRAGGLER x the
    # median holds only `ratio` of a full batch, so less of the run waits on it at the end,
    # and leaves the last TAIL_SHARE of the estimated work to the others while another runs.
    pace_every = max(5.0, 3 * float(spec.get("heartbeat_s", 10)))
    next_pace, batch_share, leave_tail = time.time() + pace_every, 1.0, False
    est = {cid: int(c.get("est_tokens", 1)) for cid, c in planned.items()}
    est_total = max(1, sum(est.values()))

    sampling, seed = run_sampling(spec)
    too_long = spec.get("too_long") or {}
    max_attempts = int(spec.get("max_attempts", 2))
    isolating: int | None = None  # the suspect chunk this worker runs alone: nothing else is claimed meanwhile
    suspects_waiting = False  # suspect chunks were left for when nothing else is in flight

    def is_suspect(cid: int) -> bool:
        return isolate.suspect(run, cid, max_attempts)

    def ensure_engine() -> Any:
        nonlocal engine
        if engine is None:
            hb.update(state="loading")
            t0 = time.time()
            from .engine import Engine

            if spec.get("endpoint"):  # batch through running servers: no model load here
                from .http_engine import HttpEngine

                engine = HttpEngine(spec["endpoint"], spec["model"])
            else:
                engine = Engine.shared(spec["model"])
            hb.update(engine_start_s=round(time.time() - t0, 3), state="running",
                      vllm_port=os.environ.get("VLLM_PORT"),  # TP/PP workers: their own range
                      compile_cache=getattr(engine, "compile_cache", None))
        return engine

    def feed(chunk: _Chunk, lo: int, hi: int) -> None:
        """Records [lo, hi) of a chunk into the engine, the attempt recorded first: if the
        engine's process dies now, the next holder knows this range was in its batch."""
        eng = ensure_engine()
        isolate.record_attempt(run, chunk.id, (lo, hi), owner.worker_id, alone=chunk.id == isolating)
        chunk.fed = (lo, hi)
        for r in chunk.records[lo:hi]:
            faults.point("record", r.get("id"))
        eng.add(chunk.records[lo:hi], sampling, seed)

    def advance(chunk: _Chunk) -> bool:
        """A suspect chunk's next range into the engine; True once every record is in a part
        (its rows then hold the whole chunk, ready to publish)."""
        while True:
            step = isolate.next_step((0, chunk.size), isolate.attempts(run, chunk.id)[1],
                                     set(isolate.done_parts(run, chunk.id)), max_attempts)
            if step is None:
                chunk.rows, chunk.part = isolate.read_parts(run, chunk.id), None
                return True
            what, (lo, hi) = step
            if what == "poison":
                from .engine import error_result

                row = error_result(chunk.records[lo], isolate.poison_reason(max_attempts), 500)
                row.update(chunk.source.origin(lo))
                isolate.save_part(run, chunk.id, (lo, hi), [row])
                continue
            chunk.rows, chunk.part = [], (lo, hi)
            feed(chunk, lo, hi)
            return False

    def start(cid: int, backup: bool = False) -> list[dict]:
        """Read a chunk's records (checked against the plan) and put it in flight."""
        source = read_chunk_source(run.input_copy, planned[cid], spec["input"])
        records = source.records
        for r in records:
            r["worker"], r["chunk"] = owner.worker_id, cid
            fit = too_long.get(str(r["index"]))
            if fit:  # found at plan time (models/fit.py): truncated, or failed without the engine
                r["too_long"] = fit
        inflight[cid] = _Chunk(cid, len(records), time.time(), backup=backup, source=source, records=records)
        hb.update(in_flight={c: len(k.rows) for c, k in inflight.items()})
        return records

    try:
        while True:
            if engine is not None and spec.get("straggler_pacing", True) and time.time() >= next_pace:
                next_pace = time.time() + pace_every
                p = claims.pace(run, owner.worker_id, fresh_s=3 * hb.interval_s)
                if p is not None:
                    straggler = p.ratio < claims.STRAGGLER
                    batch_share = p.ratio if straggler else 1.0
                    if straggler and p.others_running:
                        taken = run.done_chunks() | run.claimed_chunks()
                        left = sum(e for cid, e in est.items() if cid not in taken)
                        leave_tail = left < claims.TAIL_SHARE * est_total
                    else:
                        leave_tail = False
                    hb.update(pace=round(p.ratio, 3), straggler=straggler)
            if suspects_waiting and not inflight:
                suspects_waiting = False  # nothing else in flight now: a suspect chunk can run alone
            while not exhausted and not leave_tail and isolating is None and not suspects_waiting \
                    and len(inflight) < max_in_flight and (
                        engine is None or engine.unfinished < max(1, int(engine.max_num_seqs * batch_share))):
                if max_chunks is not None and claimed >= max_chunks:
                    exhausted = True
                    break
                deferred: list[int] = []

                def skip(c: int) -> bool:  # a suspect runs alone: left for later while others are in flight
                    if inflight and is_suspect(c):
                        deferred.append(c)
                        return True
                    return False

                cid = next_chunk(run, n_chunks, owner, lease_s, skip)
                if cid is None:
                    suspects_waiting = bool(deferred)
                    exhausted = not deferred
                    break
                faults.point("claimed", run.claim_path(cid))
                start(cid)
                claimed += 1
                chunk = inflight[cid]
                if is_suspect(cid):
                    isolating = cid
                    hb.update(isolating=cid)
                    if advance(chunk):  # every record already in a part (a holder died publishing)
                        _finish(run, chunk, owner, hb)
                        isolate.forget(run, cid)
                        isolating = None
                        hb.update(isolating=None)
                        del inflight[cid]
                else:
                    feed(chunk, 0, chunk.size)
            if not inflight and leave_tail:
                break  # the others finish the tail; a straggler's backup copy would not win
            if not inflight and exhausted and backups_left > 0 and engine is not None:
                # Nothing left to claim and this worker is idle: re-execute the tail (MapReduce's
                # backup tasks). First complete output wins; see rundir.publish_chunk_output.
                cid = _claim_backup(run, owner, sizes, lease_s, max_attempts)
                if cid is not None:
                    backups_left -= 1
                    hb.update(backups=hb.state.get("backups", 0) + 1)
                    start(cid, backup=True)
                    feed(inflight[cid], 0, sizes[cid])
            if not inflight:
                break
            if hb.run_deleted:  # the heartbeat thread looks every interval; before a write, we look too
                raise RunDeleted(run.root)
            faults.point("step")
            finished = [row for row in engine.step() if row["chunk"] in inflight]  # abandoned chunks: dropped
            for row in finished:
                chunk = inflight[row["chunk"]]
                if row.get("error"):  # refused by the engine: the record's error, with its input line
                    row.update(chunk.source.origin(row["index"] - chunk.source.first_index))
                chunk.rows.append(row)
            for chunk in [inflight[c] for c in {r["chunk"] for r in finished}]:
                if chunk.part is not None and len(chunk.rows) == chunk.part[1] - chunk.part[0]:
                    if not run.manifest.exists():
                        raise RunDeleted(run.root)
                    isolate.save_part(run, chunk.id, chunk.part, chunk.rows)
                    chunk.fed = None  # written: nothing of this chunk is in the engine now
                    if not advance(chunk):
                        continue
                if chunk.part is None and len(chunk.rows) == chunk.size:
                    if not run.manifest.exists():
                        raise RunDeleted(run.root)
                    _finish(run, chunk, owner, hb)
                    if isolating == chunk.id:
                        isolate.forget(run, chunk.id)
                        isolating = None
                        hb.update(isolating=None)
                    del inflight[chunk.id]
            if time.time() - last_done_check > 1.0:  # another copy published first: stop ours
                last_done_check = time.time()
                for cid in [c for c in inflight if run.chunk_done(c)]:
                    engine.abort(cid)
                    if isolating == cid:
                        isolating = None
                    if not inflight[cid].backup:
                        claims.release(run, cid, owner)
                    del inflight[cid]
                    hb.update(abandoned=hb.state.get("abandoned", 0) + 1)
            generating = int(getattr(engine, "generating_tokens", 0))
            if finished:  # the sums walk every finished row in flight: only when some finished
                hb.update(in_flight={c: len(k.rows) for c, k in inflight.items()},
                          in_flight_tokens=sum(r["output_tokens"] for k in inflight.values() for r in k.rows),
                          generating_tokens=generating,
                          in_flight_prompt_tokens=sum(r["prompt_tokens"] for k in inflight.values() for r in k.rows))
            elif generating != hb.state.get("generating_tokens"):
                hb.update(generating_tokens=generating)
    except RunDeleted as e:
        hb._stop.set()
        print(f"worker {owner.worker_id}: {e}", file=sys.stderr)
        return dict(hb.state, state="run deleted")
    except BaseException as e:
        for cid, chunk in inflight.items():
            if chunk.fed and not isolate.engine_died(e):  # a bug, a cancel, a preemption: not the records' doing
                isolate.record_attempt(run, cid, chunk.fed, owner.worker_id, alone=cid == isolating, released=True)
            claims.release(run, cid, owner)
        # the user sees this line in `launch` and `status`, not only "FAILED"
        hb.update(error=(f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:500])
        hb.stop("failed")
        raise
    hb.stop("finished")
    return dict(hb.state)


def run_sampling(spec: dict) -> tuple[dict | None, int | None]:
    """(sampling, seed) every record starts from. OpenAI batch lines (data.batch_defaults=
    server, the default) start from nothing: what a body leaves out takes vLLM's server
    defaults, as in `vllm run-batch`; the run's sampling group and seed do not apply."""
    if spec["input"].get("format") == "openai_batch" and spec.get("batch_defaults", "server") == "server":
        return None, None
    return spec.get("sampling") or {}, spec.get("seed")


def _finish(run: RunDir, chunk: _Chunk, owner: claims.Owner, hb: Heartbeat) -> None:
    """Write a chunk's output atomically, then drop its claim and count it."""
    rows = sorted(chunk.rows, key=lambda r: r["index"])
    indices = [r["index"] for r in rows]
    if indices != list(range(indices[0], indices[0] + len(rows))):
        raise RuntimeError(f"chunk {chunk.id}: engine returned records {indices}, not one contiguous range")
    published = publish_chunk_output(run.out_path(chunk.id), chunk.id, encode_chunk_output(
        chunk.id, rows, worker=owner.worker_id, started=round(chunk.started, 3), finished=round(time.time(), 3),
        **({"backup": True} if chunk.backup else {})))
    if not chunk.backup:
        claims.release(run, chunk.id, owner)
    s = hb.state
    if not published:  # another copy finished first: ours is discarded, nothing counted twice
        hb.update(abandoned=s.get("abandoned", 0) + 1)
        return
    hb.update(
        chunks_done=s["chunks_done"] + 1,
        records_done=s["records_done"] + len(rows),
        prompt_tokens=s["prompt_tokens"] + sum(r["prompt_tokens"] for r in rows),
        output_tokens=s["output_tokens"] + sum(r["output_tokens"] for r in rows),
        last_chunk_s=round(time.time() - chunk.started, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--max-chunks", type=int, default=None)
    args = parser.parse_args(argv)
    state = run_worker(args.run_dir, args.worker_id, args.max_chunks)
    print(f"worker {state['worker']}: {state['chunks_done']} chunks, {state['records_done']} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
