"""Merge chunk outputs into one result file: every record exactly once, input order.

Each chunk's output is checked against the chunk's input (same record indices, each
once) before anything is written; a corrupt or foreign file is refused with its name
and line. The result file is written atomically, so a half-merged file never exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .rundir import RunDir, read_json, read_jsonl, write_atomic, write_json
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


def _load_chunk(run: RunDir, cid: int) -> list[dict]:
    expected = {r["index"] for r in read_jsonl(run.chunk_path(cid))}
    path = run.out_path(cid)
    rows = []
    seen: set[int] = set()
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                index = row["index"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} line {line_no}: corrupt output ({type(e).__name__}); "
                                f"delete {path} and relaunch to redo chunk {cid}") from None
            if index not in expected or index in seen:
                raise UserError(f"{path} line {line_no}: record {index} does not belong to chunk {cid} or repeats; "
                                f"delete {path} and relaunch to redo the chunk")
            seen.add(index)
            rows.append(row)
    if seen != expected:
        raise UserError(f"{path}: has {len(seen)} of the chunk's {len(expected)} records (truncated?); "
                        f"delete it and relaunch to redo chunk {cid}")
    return rows


def merge(run: RunDir, fmt: str = "jsonl", allow_partial: bool = False, gpus_per_worker: int = 1) -> Summary:
    manifest = read_json(run.manifest)
    spec = read_json(run.worker_spec)
    n = manifest["n_records"]
    done = run.done_chunks() & set(range(manifest["n_chunks"]))
    missing = sorted(set(range(manifest["n_chunks"])) - done)
    if missing and not allow_partial:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(f"run {run.root} is incomplete: {len(missing)} of {manifest['n_chunks']} chunks have no output "
                        f"({shown}). Relaunch the same command to finish them, or merge with merge.allow_partial=true.")
    results: list[dict | None] = [None] * n
    for cid in sorted(done):
        for row in _load_chunk(run, cid):
            results[row["index"]] = row
    rows = [r for r in results if r is not None]
    sampling = spec.get("sampling", {})
    for r in rows:
        r["sampling"] = sampling
    partial = bool(missing)
    out = run.root / f"results{'.partial' if partial else ''}.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:  # free-form dicts do not fit one arrow schema; keep them as JSON text
            r["sampling"] = json.dumps(r["sampling"])
            if "fields" in r:
                r["fields"] = json.dumps(r["fields"], ensure_ascii=False)
            if "messages" in r:
                r["messages"] = json.dumps(r["messages"], ensure_ascii=False)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(out)
    else:
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    summary = _summarize(run, manifest, rows, out, fmt, missing, sampling, gpus_per_worker)
    write_json(run.summary, asdict(summary))
    return summary


def _summarize(run: RunDir, manifest: dict, rows: list[dict], out: Path, fmt: str, missing: list[int],
               sampling: dict, gpus_per_worker: int) -> Summary:
    beats = read_heartbeats(run)
    starts = [b["started"] for b in beats if "started" in b]
    ends = [run.out_path(c).stat().st_mtime for c in range(manifest["n_chunks"]) if c not in missing]
    wall = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = sum(r.get("output_tokens", 0) for r in rows)
    worker_s = sum(max(0.0, b.get("t", b["started"]) - b["started"]) for b in beats if "started" in b)
    return Summary(
        run=str(run.root),
        results=str(out),
        format=fmt,
        partial=bool(missing),
        records=len(rows),
        records_expected=manifest["n_records"],
        chunks=manifest["n_chunks"],
        chunks_missing=missing,
        prompt_tokens=sum(r.get("prompt_tokens", 0) for r in rows),
        output_tokens=out_tokens,
        wall_s=round(wall, 3),
        output_tokens_per_s=round(out_tokens / wall, 2) if wall > 0 else 0.0,
        worker_s=round(worker_s, 3),
        gpu_hours=round(worker_s * gpus_per_worker / 3600, 4),
        workers=len(beats),
        engine_start_s=[b["engine_start_s"] for b in beats if b.get("engine_start_s") is not None],
        sampling=sampling,
    )
