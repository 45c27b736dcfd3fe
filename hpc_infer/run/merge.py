"""Merge chunk outputs into one result file: every record exactly once, input order.

Chunks are contiguous input ranges, so the result is the chunk outputs concatenated in
chunk order. Each output's trailer (chunk id, record range, byte count, CRC-32; see
rundir.encode_chunk_output) is checked against the manifest, and its CRC against the
bytes copied, so a cut, edited, duplicated or foreign file is refused with its name,
without parsing a million JSON lines. The result is written atomically.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import RecordsFailed, UserError
from ..rundir import (
    TRAILER_KEY,
    RunDir,
    read_heartbeats,
    set_permissions,
    trust,
)
from ..rundir.beats import seconds_ran
from ..rundir.chunks import trailer_in
from ..rundir.fsio import Dir
from .timeline import draw_timeline


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
    worker_s: float  # sum over workers of their running time, every process of a requeued task included
    gpu_hours: float
    workers: int
    engine_start_s: list[float] = field(default_factory=list)
    launches: list[dict] = field(default_factory=list)  # each launch's span, one clock each (launch_spans)
    input: dict | None = None  # what was read: the path, or a Hub repo's commit, subset, split and files
    planning: dict | None = None  # prefix groups the records were planned in (run/plan.py), or None
    prefix_cache: dict | None = None  # prompt tokens vLLM's prefix cache held: tokens and hit rate
    engine_settings: dict = field(default_factory=dict)  # what the engine ran with (tuned ones named)
    sampling: dict = field(default_factory=dict)
    timeline: str | None = None  # timeline.png: chunks per worker over time
    slowest_chunks: list[dict] = field(default_factory=list)  # the longest-running chunks (slowest_chunks)
    postprocess: dict | None = None  # hook target, records, sums and means of the fields it added
    errors: int = 0  # records the engine refused (each one an error record, listed in errors.jsonl)
    error_types: dict = field(default_factory=dict)
    errors_file: str | None = None
    on_error: str = "keep"


def _corrupt(path: Path, cid: int, why: str) -> UserError:
    return UserError(f"{path}: {why}; delete {path} and relaunch the same command to redo chunk {cid}")


@dataclass
class _Checked:
    """A chunk output whose trailer matches the manifest (its CRC is checked while copying)."""

    id: int
    path: Path
    body_bytes: int
    crc32: int
    records: int
    prompt_tokens: int
    output_tokens: int
    worker: str = "?"
    started: float | None = None
    finished: float | None = None
    errors: int = 0
    error_types: dict = field(default_factory=dict)
    cached_tokens: int | None = None  # prompt tokens served from vLLM's prefix cache, when reported
    load: Callable[[], bytes] | None = None  # a block of a prefix-grouped run in input order (its bytes, checked)
    fs: Any = field(default=None, repr=False)  # the run's pinned handle: outputs are opened through it, judged

    def open(self) -> BinaryIO:
        return os.fdopen(self.fs.open_file(RunDir.out_name(self.id)), "rb")


def slowest_chunks(checked: list[_Checked], n: int = 5) -> list[dict]:
    """The n chunks that ran longest, with their worker and rate: where a straggler or a
    slow record shows (each chunk's times are its own worker's clock, so a duration is
    never across two clocks)."""
    timed = sorted(
        ((c.finished - c.started, c) for c in checked if c.started is not None and c.finished is not None),
        key=lambda sc: sc[0],
        reverse=True,
    )
    return [
        {
            "chunk": c.id,
            "worker": c.worker,
            "records": c.records,
            "output_tokens": c.output_tokens,
            "seconds": round(s, 2),
            "output_tokens_per_s": round(c.output_tokens / s, 1) if s > 0 else None,
        }
        for s, c in timed[:n]
    ]


def prefix_cache_hits(checked: list[_Checked]) -> dict | None:
    """The share of prompt tokens vLLM found in its prefix cache, over the chunks whose
    engine reported it (vLLM's RequestOutput.num_cached_tokens); None when none did."""
    reported = [c for c in checked if c.cached_tokens is not None]
    if not reported:
        return None
    prompt, cached = sum(c.prompt_tokens for c in reported), sum(c.cached_tokens for c in reported)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": round(cached / prompt, 4) if prompt else 0.0}


def check_trailer(run: RunDir, chunk: dict) -> _Checked:
    """Read a chunk output's trailer and hold it against the manifest's chunk table."""
    cid, path = chunk["id"], run.out_path(chunk["id"])
    found = trailer_in(run.fs, run.out_name(cid))
    if found is None:
        raise _corrupt(path, cid, "no valid trailer line (cut short, or not written by an hpc_infer worker)")
    t, body = found
    if t.get(TRAILER_KEY) != cid:
        raise _corrupt(path, cid, f"holds the output of chunk {t.get(TRAILER_KEY)}, not chunk {cid}")
    want = (chunk["n_records"], chunk["first_index"], chunk["last_index"])
    if (t.get("records"), t.get("first"), t.get("last")) != want:
        raise _corrupt(
            path,
            cid,
            f"covers records {t.get('first')}..{t.get('last')} ({t.get('records')}), "
            f"the chunk is {want[1]}..{want[2]} ({want[0]})",
        )
    if t.get("bytes") != body:
        raise _corrupt(
            path, cid, f"has {body} bytes of records, its trailer says {t.get('bytes')} (lines added, removed or cut)"
        )
    return _Checked(
        cid,
        path,
        body,
        int(t["crc32"]),
        want[0],
        int(t.get("prompt_tokens", 0)),
        int(t.get("output_tokens", 0)),
        str(t.get("worker", "?")),
        t.get("started"),
        t.get("finished"),
        int(t.get("errors", 0)),
        dict(t.get("error_types") or {}),
        int(t["cached_tokens"]) if t.get("cached_tokens") is not None else None,
        fs=run.fs,
    )


def _copy_checked(chunk: _Checked, out: BinaryIO, block: int = 8 << 20) -> None:
    """Append a chunk's records to `out`, verifying the CRC of exactly the bytes copied."""
    if chunk.load is not None:  # an input-order block of a grouped run: its chunks' CRCs were checked
        out.write(chunk.load())
        return
    crc, left = 0, chunk.body_bytes
    with chunk.open() as f:
        while left:
            data = f.read(min(block, left))
            if not data:
                raise _corrupt(chunk.path, chunk.id, "shorter than its trailer says")
            crc = zlib.crc32(data, crc)
            out.write(data)
            left -= len(data)
    if crc != chunk.crc32:
        raise _corrupt(chunk.path, chunk.id, "records do not match their checksum (edited or damaged)")


def input_order_blocks(run: RunDir, manifest: dict, checked: list[_Checked], per_block: int = 4096) -> list[_Checked]:
    """A prefix-grouped run's records in input order, as blocks the writers take like chunks.
    Each chunk's output holds its records sorted by index, which order.bin names, so no
    line is parsed: every chunk is read once (its CRC checked, its lines' offsets noted),
    then each block reads its lines back by offset when it is written."""
    import array

    from ..rundir.chunks import read_order

    entries = {c["id"]: c for c in manifest["chunks"]}
    n = manifest["n_records"]
    where_chunk, where_off, where_len = array.array("q", [-1]) * n, array.array("q", [0]) * n, array.array("q", [0]) * n
    has_error = bytearray(n)
    for c in checked:
        with c.open() as f:
            body = f.read(c.body_bytes)
        if len(body) != c.body_bytes:
            raise _corrupt(c.path, c.id, "shorter than its trailer says")
        if zlib.crc32(body) != c.crc32:
            raise _corrupt(c.path, c.id, "records do not match their checksum (edited or damaged)")
        indices = sorted(row[0] for row in read_order(run.fs, *entries[c.id]["positions"]))
        start = 0
        for index in indices:
            end = body.index(b"\n", start) + 1
            where_chunk[index], where_off[index], where_len[index] = c.id, start, end - start
            has_error[index] = b'"error": {' in body[start:end]
            start = end
    present = [i for i in range(n) if where_chunk[i] >= 0]
    by_id = {c.id: c for c in checked}

    def loader(indices: list[int]) -> Callable[[], bytes]:
        def load() -> bytes:
            parts, files = [], {}
            try:
                for i in indices:
                    cid = where_chunk[i]
                    if cid not in files:
                        files[cid] = by_id[cid].open()
                    files[cid].seek(where_off[i])
                    parts.append(files[cid].read(where_len[i]))
            finally:
                for f in files.values():
                    f.close()
            return b"".join(parts)

        return load

    blocks = []
    for b in range(0, len(present), per_block):
        idx = present[b : b + per_block]
        blocks.append(
            _Checked(
                -1 - len(blocks), run.out, 0, 0, len(idx), 0, 0, errors=sum(has_error[i] for i in idx), load=loader(idx)
            )
        )
    return blocks


def _write_jsonl(fs: Dir, chunks: list[_Checked], out: Path, drop_errors: bool = False) -> None:
    """Concatenate the checked chunk outputs in chunk order (= input order). With
    merge.on_error=drop, the few chunks holding error records are parsed and filtered."""
    with fs.writing(out.name, "merge_tmp_written", "merge_renamed") as f:
        for c in chunks:
            if drop_errors and c.errors:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(c, None, True)).encode())
            else:
                _copy_checked(c, f)


ERROR_KEY = "_hpc_infer_error"


def _write_errors(fs: Dir, chunks: list[_Checked], out: Path) -> None:
    """errors.jsonl: each failed record's input row as it was written (a valid input for a
    follow-up run: data.path=errors.jsonl data.format=jsonl, or openai_batch for a batch
    file), with what failed under `_hpc_infer_error`. Only chunks with errors are parsed."""
    with fs.writing(out.name, "merge_tmp_written", "merge_renamed") as f:
        for c in chunks:
            if not c.errors:
                continue
            for r in _records(c, None):
                if r.get("error"):
                    where = {k: r[k] for k in ("line", "row") if k in r}
                    row = r.get("input") if isinstance(r.get("input"), dict) else {"id": r["id"]}
                    row = dict(row, **{ERROR_KEY: dict(id=r["id"], index=r["index"], **where, **r["error"])})
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def _records(chunk: _Checked, hook: "Hook | None", drop_errors: bool = False) -> list[dict]:
    """A checked chunk's records, parsed, with the post-processing hook applied; without
    its error records with merge.on_error=drop."""
    with io.BytesIO() as buf:
        _copy_checked(chunk, buf)
        rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    if drop_errors:
        rows = [r for r in rows if not r.get("error")]
    if hook:
        for r in rows:
            hook(r)
    return rows


class Hook:
    """Applies merge.postprocess to each record and totals the numeric fields it adds."""

    def __init__(self, spec: dict, group_by: list[str] | None = None):
        from ..config import postprocess_fn
        from .metrics import Metrics

        self.target = spec["_target_"]
        self.fn = postprocess_fn(spec)
        self.records = 0
        self.sums: dict[str, float] = {}
        func = getattr(self.fn, "func", self.fn)  # what the hook says its per-output score and answer are
        score = getattr(func, "score_key", None)
        self.metrics = (
            Metrics(score, getattr(func, "answer_key", None), getattr(func, "format_key", None), list(group_by or []))
            if score
            else None
        )

    def __call__(self, record: dict) -> None:
        if record.get("error"):  # nothing was generated: nothing to grade, a failed record in the metrics
            if self.metrics:
                self.metrics.add(record)
            return
        try:
            added = self.fn(record)
        except Exception as e:
            raise UserError(
                f"merge.postprocess {self.target} failed on record {record.get('id')!r} "
                f"({type(e).__name__}: {e}); fix the hook and merge again (`hpc-infer merge RUN`), "
                f"or merge without it: `hpc-infer merge RUN --no-postprocess`"
            ) from None
        if not isinstance(added, dict):
            raise UserError(f"merge.postprocess {self.target} returned {type(added).__name__}, not a dict of fields")
        record.update(added)
        if self.metrics:
            self.metrics.add(record)
        self.records += 1
        for k, v in added.items():
            if isinstance(v, (int, float)):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def summary(self) -> dict:
        return {
            "target": self.target,
            "records": self.records,
            "sums": self.sums,
            "means": {k: round(v / self.records, 6) for k, v in self.sums.items()} if self.records else {},
            **({"metrics": self.metrics.result()} if self.metrics else {}),
        }


def _write_jsonl_parsed(
    fs: Dir,
    chunks: list[_Checked],
    out: Path,
    hook: Hook | None,
    transform: Callable[[dict], dict] | None = None,
    drop_errors: bool = False,
) -> None:
    """With a hook or another output shape, each record is parsed, extended or reshaped,
    and written again (slower than the checked copy)."""
    with fs.writing(out.name, "merge_tmp_written", "merge_renamed") as f:
        for c in chunks:
            rows = _records(c, hook, drop_errors)
            f.write(
                "".join(json.dumps(transform(r) if transform else r, ensure_ascii=False) + "\n" for r in rows).encode()
            )


def _rows(chunk: _Checked, hook: Hook | None = None, drop_errors: bool = False) -> list[dict]:
    rows = _records(chunk, hook, drop_errors)
    for r in rows:  # free-form values become JSON text, so every chunk has the same columns
        for key in ("fields", "messages", "input", "error"):
            if key in r:
                r[key] = json.dumps(r[key], ensure_ascii=False)
    return rows


def _write_parquet(
    fs: Dir, chunks: list[_Checked], out: Path, hook: Hook | None = None, drop_errors: bool = False
) -> None:
    """One row group per chunk, so memory holds one chunk, not the run. Each chunk is parsed
    (and graded by the hook) once: its table is spooled to an Arrow file beside the result
    while the schema is unified over all chunks (a column null in one chunk is typed by
    another), then each is read back, cast and written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the spool beside the result, in the pinned folder itself (its descriptor's path), never
    # in whatever folder the path names by now
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.spool-", dir=fs.fd_path()) as spool:
        schemas, paths = [], []
        for c in chunks:
            table = pa.Table.from_pylist(_rows(c, hook, drop_errors))
            path = Path(spool) / f"{c.id:05d}.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            schemas.append(table.schema)
            paths.append(path)
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        with (
            fs.writing(out.name, "merge_tmp_written", "merge_renamed") as f,
            pq.ParquetWriter(f, schema) as w,
        ):
            for path in paths:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
                w.write_table(_conform(table, schema))


def _conform(table, schema):
    """A chunk's table with every column of the unified schema, in its order and types."""
    import pyarrow as pa

    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


ON_ERROR = ("keep", "drop", "fail")


def merge(
    run: RunDir,
    fmt: str = "jsonl",
    allow_partial: bool = False,
    gpus_per_worker: int | None = None,
    postprocess: dict | None = None,
    on_error: str = "keep",
    dest: Path | None = None,
    group_by: list[str] | None = None,
) -> Summary:
    """Check every finished chunk, then write the result file and summary.json.

    Every trailer is checked before the first byte is written; each chunk's CRC is
    checked as it is copied. Any failure leaves no result file behind. One merge of a
    run at a time: a second one waits for the first (and says so).

    Records the engine refused are error records (merge.on_error): `keep` them in the
    results in their place (default; every input record appears exactly once), `drop`
    them from the results, or `fail`: like keep, and the command exits 3 (`report_errors`).
    errors.jsonl lists them in every case.

    `dest`: where the results, summary, errors and timeline go (default: the run directory;
    a teammate merging a group run they may read but not write gives a folder of theirs).
    `gpus_per_worker`: default the run's own (worker.json), so a standalone merge reports
    the GPU-hours the run used.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"merge.on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
    spec = run.read_json("worker.json")
    dest = Path(dest) if dest else run.root
    # every file the merge writes goes through a pinned handle of its folder (the run's own,
    # or --out's, judged as the caller's): never into whatever a path names by the time it is written
    if dest == run.root:  # whoever merges (a standalone `hpc-infer merge` too), the files follow the run's permissions
        set_permissions(spec.get("permissions"))
        dest_fs = run.fs
    else:
        dest.mkdir(parents=True, exist_ok=True)
        dest_fs = trust.open_dir(dest, "merge --out", trust.OWN)
    if gpus_per_worker is None:
        gpus_per_worker = int(spec.get("gpus_per_worker", 0))
    with _merge_lock(dest):
        return _merge(run, fmt, allow_partial, gpus_per_worker, postprocess, on_error, dest, dest_fs, group_by)


def report_errors(summary: Summary, say: Callable[[str], None]) -> None:
    """The closing line about failed records; with merge.on_error=fail, exit 3 after it."""
    if not summary.errors:
        return
    if summary.on_error == "fail":
        raise RecordsFailed(f"{errors_line(summary)} (merge.on_error=fail)")
    say(errors_line(summary))


def errors_line(s: Summary) -> str:
    """The line `launch` and `merge` end with when records failed."""
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(s.error_types.items(), key=lambda kv: -kv[1]))
    kept = {
        "keep": "kept in the results as error records",
        "drop": "left out of the results",
        "fail": "kept in the results as error records",
    }[s.on_error]
    return (
        f"{s.errors} of {s.records_expected} records failed ({kinds}); {kept}; listed in {s.errors_file} "
        f"(a valid input for a follow-up run)"
    )


@contextmanager
def _merge_lock(dest: Path) -> Iterator[None]:
    """One merge into `dest` at a time (a lock file with a lease: rundir/lease.py, no flock)."""
    from ..rundir.lease import Lock

    def waiting() -> None:
        print(f"[hpc_infer] another merge into {dest} is running; waiting for it", file=sys.stderr, flush=True)

    with Lock(dest / ".merge.lock", lease_s=120, on_wait=waiting):
        yield


def _merge(
    run: RunDir,
    fmt: str,
    allow_partial: bool,
    gpus_per_worker: int,
    postprocess: dict | None,
    on_error: str,
    dest: Path,
    dest_fs: Dir,
    group_by: list[str] | None = None,
) -> Summary:
    manifest = run.read_json("manifest.json")
    spec = run.read_json("worker.json")
    done = run.output_files() & set(range(manifest["n_chunks"]))  # damaged ones are named by check_trailer
    missing = sorted(set(range(manifest["n_chunks"])) - done)
    if missing and not allow_partial:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(
            f"run {run.root} is incomplete: {len(missing)} of {manifest['n_chunks']} chunks have no output "
            f"({shown}). Relaunch the same command to finish them, or merge with merge.allow_partial=true."
        )
    checked = [check_trailer(run, c) for c in manifest["chunks"] if c["id"] in done]
    ordered = checked  # what is written, in input order
    if manifest.get("grouped"):  # chunks of prefix groups: their records interleave in the input
        ordered = input_order_blocks(run, manifest, checked)
    out = dest / run.results(fmt, partial=bool(missing)).name
    hook = Hook(postprocess, group_by) if postprocess else None
    drop = on_error == "drop"
    if fmt == "parquet":
        _write_parquet(dest_fs, ordered, out, hook, drop)
    elif fmt == "openai_batch":
        from ..io.openai_batch import result_to_response

        name, created = spec["model"].get("served_name") or Path(spec["model"]["path"]).name, int(manifest["created"])
        _write_jsonl_parsed(
            dest_fs,
            ordered,
            out,
            hook,
            lambda r: result_to_response(r, name, created, f"{run.root}:{manifest['created']}"),
            drop,
        )
    elif hook:
        _write_jsonl_parsed(dest_fs, ordered, out, hook, drop_errors=drop)
    else:
        _write_jsonl(dest_fs, ordered, out, drop)
    errors_path = dest / "errors.jsonl"
    n_errors = sum(c.errors for c in checked)
    if n_errors:
        _write_errors(dest_fs, ordered, errors_path)
    elif dest_fs.stat(errors_path.name) is not None:  # an earlier merge's list: nothing failed in this one
        dest_fs.unlink(errors_path.name)
    beats = read_heartbeats(run)
    sampling = spec.get("sampling", {})
    if spec["input"].get("format") == "openai_batch":  # say which defaults the batch lines took
        sampling = (
            {
                "per_line": "the body's fields; what a body leaves out: vLLM's OpenAI-server defaults "
                "(data.batch_defaults=server)"
            }
            if spec.get("batch_defaults", "server") == "server"
            else dict(
                sampling, per_line="the body's fields over the run's sampling group and seed (data.batch_defaults=run)"
            )
        )
    summary = _summarize(run, manifest, checked, beats, out, fmt, missing, sampling, gpus_per_worker)
    summary.timeline = draw_timeline(
        dest_fs, [{k: v for k, v in asdict(c).items() if k != "fs"} for c in checked], beats, run.root.name
    )
    summary.postprocess = hook.summary() if hook else None
    summary.planning = manifest.get("grouped")
    summary.input = {"path": manifest.get("input"), **(manifest.get("source") or {})}
    summary.engine_settings = dict(
        spec["model"].get("engine_kwargs") or {},
        **({"tuned_from": spec["model"]["tuned_from"]} if spec["model"].get("tuned_from") else {}),
    )
    summary.on_error = on_error
    if n_errors and drop:
        summary.records -= n_errors  # records in the result file
    if n_errors:
        summary.errors, summary.errors_file = n_errors, str(errors_path)
        for c in checked:
            for t, k in c.error_types.items():
                summary.error_types[t] = summary.error_types.get(t, 0) + k
    dest_fs.replace(run.summary.name, (json.dumps(asdict(summary), indent=1, sort_keys=True) + "\n").encode())
    return summary


def launch_spans(run: RunDir, checked: list[_Checked]) -> list[dict]:
    """Each launch's span, on one clock: the launcher's own (recorded when its wait ended).
    A run with no such record (rendered scripts, a launch that did not wait) is measured
    on its workers' clocks from the chunk trailers, each gap over 10 minutes (a pause
    between launches) cut out."""
    from ..rundir import jobs

    spans = [
        {
            "started": round(float(r["started"]), 3),
            "ended": round(float(r["ended"]), 3),
            "wall_s": round(float(r["ended"]) - float(r["started"]), 3),
            "clock": "launcher",
        }
        for r in jobs.launches(run.fs)
    ]
    if spans:
        return spans
    timed = sorted((c.started, c.finished) for c in checked if c.started and c.finished)
    for a, b in timed:
        if spans and a - spans[-1]["ended"] <= 600:
            spans[-1]["ended"] = max(spans[-1]["ended"], b)
        else:
            spans.append({"started": a, "ended": b})
    return [dict(s, wall_s=round(s["ended"] - s["started"], 3), clock="workers") for s in spans]


def _summarize(
    run: RunDir,
    manifest: dict,
    checked: list[_Checked],
    beats: list[dict],
    out: Path,
    fmt: str,
    missing: list[int],
    sampling: dict,
    gpus_per_worker: int,
) -> Summary:
    spans = launch_spans(run, checked)
    wall = sum(s["wall_s"] for s in spans)
    out_tokens = sum(c.output_tokens for c in checked)
    worker_s = sum(seconds_ran(b) for b in beats if "started" in b)  # requeued tasks' earlier processes too
    return Summary(
        run=str(run.root),
        results=str(out),
        format=fmt,
        partial=bool(missing),
        records=sum(c.records for c in checked),
        records_expected=manifest["n_records"],
        chunks=manifest["n_chunks"],
        chunks_missing=missing,
        prompt_tokens=sum(c.prompt_tokens for c in checked),
        output_tokens=out_tokens,
        wall_s=round(wall, 3),
        output_tokens_per_s=round(out_tokens / wall, 2) if wall > 0 else 0.0,
        worker_s=round(worker_s, 3),
        gpu_hours=round(worker_s * gpus_per_worker / 3600, 4),
        workers=len(beats),
        engine_start_s=[b["engine_start_s"] for b in beats if b.get("engine_start_s") is not None],
        sampling=sampling,
        launches=spans,
        prefix_cache=prefix_cache_hits(checked),
        slowest_chunks=slowest_chunks(checked),
    )
