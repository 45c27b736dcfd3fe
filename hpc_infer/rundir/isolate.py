"""Poison records: find the record that kills the engine, fail it alone, finish the rest.

A record that ends the engine's process (a segfault, the OOM killer, a CUDA error that
takes the engine down) cannot become an error record the usual way: nothing survives
to write it. MapReduce's skip-bad-records mode is the model. Every time a range of a
chunk's records goes into an engine, one file is written into `attempts/C/` (a file of its
own, published by rename: appends from several nodes are not atomic on NFS); a range that
was put in and never written out was in the batch when its worker died. A
chunk whose whole range died `max_attempts` times is a suspect: the worker that claims
it next runs it alone (nothing else in its batch, so a death blames only this chunk) and
bisects: the halves of a range that died are tried one after the other, each finished
half saved in `parts/C/LO-HI.jsonl`, until a single record has died alone
`max_attempts` times. That record becomes an error record (type `engine_died`) and the
rest of the chunk completes. Everything lives on disk, so the search goes on across
workers, resubmissions and relaunches; a death costs one engine start, and a chunk of n
records with one poison record costs at most 2 x max_attempts + ceil(log2 n) deaths
(tests/test_poison.py checks the bound). A worker that stops with an error that is not
the engine's death (a bug, a cancel, a scheduler's kill it caught) takes its attempts back,
and attempts of workers `hpc-infer cancel` ended (rundir/jobs.py: `cancelled`) or of the
chunk's live holder never count: a kill is not a poison record. Standard library only: the
worker imports it inside the cluster's image.
"""

from __future__ import annotations

import collections
import json
from typing import Iterable

from . import clock, jobs
from .layout import RunDir, chunk_id_of

Range = tuple[int, int]  # record offsets within the chunk, [lo, hi)


class EngineDied(RuntimeError):
    """The reason written into a poison record's error."""

    kind = "engine_died"
    status = 500


def attempts_path(chunk_id: int) -> str:
    """The folder of a chunk's attempts (one file each), inside the run."""
    return f"attempts/{chunk_id:05d}"


def parts_dir(chunk_id: int) -> str:
    return f"parts/{chunk_id:05d}"


def record_attempt(run: RunDir, chunk_id: int, rng: Range, worker: str, alone: bool, released: bool = False) -> None:
    """One file per range put into an engine (`alone`: nothing else in its batch), written
    before the engine sees it. `released`: the worker stopped for a reason that is not the
    engine's death (a bug, a cancel, a preemption), so that attempt says nothing about the
    records and is taken back."""
    folder = attempts_path(chunk_id)
    run.fs.mkdir(folder)
    record = {
        "range": list(rng),
        "alone": alone,
        "worker": worker,
        "t": round(clock.now(), 3),
        **({"released": True} if released else {}),
    }
    run.fs.replace(
        f"{folder}/{clock.time_ns():020d}-{clock.token()}.json",
        (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(),
    )


def attempts(run: RunDir, chunk_id: int, exclude: Iterable[str] = ()) -> tuple[int, collections.Counter]:
    """(times the whole chunk went into an engine among other chunks, times each range went
    in alone) that ended in a death: not taken back, not by a worker `hpc-infer cancel`
    ended, not by a worker in `exclude` (the chunk's live holder: its attempt is running)."""
    folder = attempts_path(chunk_id)
    names = sorted(run.fs.listdir(folder))
    if not names:
        return 0, collections.Counter()
    not_deaths = set(exclude) | jobs.cancelled(run.fs)
    shared, alone = 0, collections.Counter()
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            d = run.read_json(f"{folder}/{name}")
            lo, hi = d["range"]
            worker = str(d.get("worker"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if worker in not_deaths:
            continue
        n = -1 if d.get("released") else 1
        if d.get("alone"):
            alone[(int(lo), int(hi))] += n
        else:
            shared += n
    return max(shared, 0), +alone


def deaths(run: RunDir, chunk_id: int, exclude: Iterable[str] = ()) -> int:
    """Times a worker died with some of this chunk in its engine's batch."""
    shared, alone = attempts(run, chunk_id, exclude)
    return shared + sum(alone.values())


def suspect(run: RunDir, chunk_id: int, max_attempts: int) -> bool:
    """The chunk went into an engine max_attempts times and was never written: its holder
    died with it in the batch each time. A chunk never tried costs one stat."""
    if not run.fs.exists(attempts_path(chunk_id)):
        return False
    return attempts(run, chunk_id)[0] >= max_attempts


def done_parts(run: RunDir, chunk_id: int) -> dict[Range, str]:
    out = {}
    for name in run.fs.listdir(parts_dir(chunk_id)):
        lo, _, hi = name.removesuffix(".jsonl").partition("-")
        if name.endswith(".jsonl") and f"{lo}{hi}".isascii() and lo.isdigit() and hi.isdigit():
            out[(int(lo), int(hi))] = f"{parts_dir(chunk_id)}/{name}"
    return out


def _covered(rng: Range, done: set[Range]) -> bool:
    lo, hi = rng
    if rng in done:
        return True
    if hi - lo <= 1:
        return False
    mid = (lo + hi) // 2
    return _covered((lo, mid), done) and _covered((mid, hi), done)


def next_step(
    rng: Range, tried: collections.Counter, done: set[Range], max_attempts: int, root: bool = True
) -> tuple[str, Range] | None:
    """What to do next for a suspect chunk: ("try", range) alone, ("poison", one record),
    or None when every record is in a finished part. `tried` counts tries alone; each one
    not in a part died. Ranges are the nodes of the chunk's halving tree, so parts never
    overlap. The whole chunk (the root) is not tried alone first: it already died, and its
    halves cost no death when it is innocent (it only shared a batch with the poison)."""
    if _covered(rng, done):
        return None
    lo, hi = rng
    if tried[rng] == 0 and (not root or hi - lo == 1):
        return "try", rng
    if hi - lo == 1:
        return ("poison", rng) if tried[rng] >= max_attempts else ("try", rng)
    mid = (lo + hi) // 2
    return next_step((lo, mid), tried, done, max_attempts, False) or next_step(
        (mid, hi), tried, done, max_attempts, False
    )


def save_part(run: RunDir, chunk_id: int, rng: Range, rows: list[dict]) -> None:
    folder = parts_dir(chunk_id)
    run.fs.mkdir(folder)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    run.fs.replace(f"{folder}/{rng[0]:06d}-{rng[1]:06d}.jsonl", body)


def read_parts(run: RunDir, chunk_id: int) -> list[dict]:
    rows = []
    for rng, name in sorted(done_parts(run, chunk_id).items()):
        rows.extend(json.loads(line) for line in run.fs.read(name).splitlines() if line.strip())
    return rows


def forget(run: RunDir, chunk_id: int) -> None:
    """After the chunk's output is published, its parts are redundant."""
    run.fs.rmtree(parts_dir(chunk_id))


def poison_reason(tried: int) -> EngineDied:
    return EngineDied(
        f"the engine's process died each time this record was in its batch, alone ({tried} times); "
        f"the rest of its chunk completed without it. Typical causes: a segfault or an OOM kill "
        f"on this input, or a CUDA error. The worker logs hold the cause."
    )


def engine_died(exc: BaseException) -> bool:
    """An exception that means the engine's process died under the worker (vLLM raises
    EngineDeadError when its engine core process is gone; the `record` failpoint's RAISE
    stands for that): its attempts stay counted."""
    return type(exc).__name__ == "EngineDeadError" or bool(getattr(exc, "engine_died", False))


def run_marker(run: RunDir) -> tuple[int, int, int]:
    """Changes whenever a round of workers got further: a chunk published, an engine death
    recorded, a part saved (attempts taken back do not count). The launcher resubmits only
    after a round that changed it."""
    tried = [cid for cid in map(chunk_id_of, run.fs.listdir("attempts")) if cid is not None]
    died = sum(deaths(run, cid) for cid in tried)
    parts = sum(len(run.fs.listdir(f"parts/{n}")) for n in run.fs.listdir("parts") if chunk_id_of(n) is not None)
    return len(run.done_chunks()), died, parts
