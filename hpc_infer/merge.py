"""Merge chunk outputs into one result file: every record exactly once, input order.

Each chunk's output is checked against the chunk's input (same record indices, each
once) before anything is written; a corrupt or foreign file is refused with its name
and line. The result file is written atomically, so a half-merged file never exists.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .rundir import RunDir, read_json, write_json
from .status import read_heartbeats


@dataclass
class Summary:
    run: str
    results: str
    format: str
    partial: bool
    records: int
    records_expected: int
    chunks: int
    chunks_missing: list[int]
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    worker_s: float  # sum over workers of their lifetime
    gpu_hours: float
    workers: int
    engine_start_s: list[float] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)


def _expected(run: RunDir, cid: int) -> array:
    idx = array("q")
    idx.frombytes(run.index_path(cid).read_bytes())
    return idx


def _corrupt(path, line_no: int, cid: int, why: str) -> UserError:
    return UserError(f"{path} line {line_no}: {why}; delete {path} and relaunch to redo chunk {cid}")


class _Index:
    """Where each record's output line lives: chunk, byte offset, length (arrays, not dicts:
    a million records cost ~20 MB here instead of gigabytes of parsed JSON)."""

    def __init__(self, n: int):
        self.chunk = array("i", [-1]) * n
        self.offset = array("q", [0]) * n
        self.length = array("i", [0]) * n
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.records = 0

    def add_chunk(self, run: RunDir, cid: int) -> None:
        expected = _expected(run, cid)
        want = set(expected)
        path = run.out_path(cid)
        seen = 0
        offset = 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.endswith(b"}\n"):
                    raise _corrupt(path, line_no, cid, "corrupt output (truncated line)")
                try:
                    row = json.loads(line)
                    index = row["index"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                    raise _corrupt(path, line_no, cid, f"corrupt output ({type(e).__name__})") from None
                if index not in want or self.chunk[index] == cid:
                    raise _corrupt(path, line_no, cid, f"record {index} does not belong to chunk {cid} or repeats")
                self.chunk[index], self.offset[index], self.length[index] = cid, offset, len(line)
                self.prompt_tokens += row.get("prompt_tokens", 0)
                self.output_tokens += row.get("output_tokens", 0)
                offset += len(line)
                seen += 1
        if seen != len(want):
            raise UserError(f"{path}: has {seen} of the chunk's {len(want)} records (truncated?); "
                            f"delete it and relaunch to redo chunk {cid}")
        self.records += seen


def _write_jsonl(run: RunDir, index: _Index, out: Path, sampling: dict) -> None:
    """Copy each record's line in input order (pread from the chunk files), adding the
    sampling settings by byte splice; written to a temp name and renamed."""
    tail = b', "sampling": ' + json.dumps(sampling).encode() + b"}\n"
    fds: dict[int, int] = {}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb", buffering=1 << 20) as f:
            for i in range(len(index.chunk)):
                cid = index.chunk[i]
                if cid < 0:
                    continue
                fd = fds.get(cid)
                if fd is None:
                    if len(fds) >= 256:  # stay far below the open-files limit
                        os.close(fds.pop(next(iter(fds))))
                    fd = fds[cid] = os.open(run.out_path(cid), os.O_RDONLY)
                line = os.pread(fd, index.length[i], index.offset[i])
                f.write(line[:-2])
                f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        for fd in fds.values():
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def _write_parquet(run: RunDir, index: _Index, out: Path, sampling: dict) -> None:
    """Parquet needs rows in memory; free-form dicts are kept as JSON text columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for cid in sorted({c for c in index.chunk if c >= 0}):
        rows += [json.loads(line) for line in open(run.out_path(cid), "rb")]
    rows.sort(key=lambda r: r["index"])
    for r in rows:
        r["sampling"] = json.dumps(sampling)
        for key in ("fields", "messages"):
            if key in r:
                r[key] = json.dumps(r[key], ensure_ascii=False)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out)


def merge(run: RunDir, fmt: str = "jsonl", allow_partial: bool = False, gpus_per_worker: int = 1) -> Summary:
    manifest = read_json(run.manifest)
    spec = read_json(run.worker_spec)
    done = run.done_chunks() & set(range(manifest["n_chunks"]))
    missing = sorted(set(range(manifest["n_chunks"])) - done)
    if missing and not allow_partial:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(f"run {run.root} is incomplete: {len(missing)} of {manifest['n_chunks']} chunks have no output "
                        f"({shown}). Relaunch the same command to finish them, or merge with merge.allow_partial=true.")
    index = _Index(manifest["n_records"])
    for cid in sorted(done):
        index.add_chunk(run, cid)
    sampling = spec.get("sampling", {})
    out = run.root / f"results{'.partial' if missing else ''}.{fmt}"
    (_write_parquet if fmt == "parquet" else _write_jsonl)(run, index, out, sampling)
    summary = _summarize(run, manifest, index, out, fmt, missing, sampling, gpus_per_worker)
    write_json(run.summary, asdict(summary))
    return summary


def _summarize(run: RunDir, manifest: dict, index: _Index, out: Path, fmt: str, missing: list[int],
               sampling: dict, gpus_per_worker: int) -> Summary:
    beats = read_heartbeats(run)
    starts = [b["started"] for b in beats if "started" in b]
    ends = [run.out_path(c).stat().st_mtime for c in range(manifest["n_chunks"]) if c not in missing]
    wall = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = index.output_tokens
    worker_s = sum(max(0.0, b.get("t", b["started"]) - b["started"]) for b in beats if "started" in b)
    return Summary(
        run=str(run.root),
        results=str(out),
        format=fmt,
        partial=bool(missing),
        records=index.records,
        records_expected=manifest["n_records"],
        chunks=manifest["n_chunks"],
        chunks_missing=missing,
        prompt_tokens=index.prompt_tokens,
        output_tokens=out_tokens,
        wall_s=round(wall, 3),
        output_tokens_per_s=round(out_tokens / wall, 2) if wall > 0 else 0.0,
        worker_s=round(worker_s, 3),
        gpu_hours=round(worker_s * gpus_per_worker / 3600, 4),
        workers=len(beats),
        engine_start_s=[b["engine_start_s"] for b in beats if b.get("engine_start_s") is not None],
        sampling=sampling,
    )
