"""Plan a run: token-balanced chunks, the run directory and its manifest.

Chunks are cut by estimated tokens, not record counts, and get smaller towards the end
(guided self-scheduling): early chunks amortise claims, late ones keep the tail short,
so the slowest worker does not set the finish time. Chunk 0 is the largest; workers
claim in id order. Each chunk is a contiguous range of the input, so merging is a
checked concatenation. Relaunching with the same input and settings resumes the run.
"""

from __future__ import annotations

import array
import bisect
import errno
import itertools
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ..config import RunConfig
from ..io.data import InputScan, file_fingerprint, input_spec, load_template
from ..io.sources import resolve as resolve_source
from ..io.records import PREFIX_CHARS
from ..errors import UserError
from ..rundir import SUBDIRS, RunDir, secure_root, write_json
from ..rundir.fsio import fd_path
from ..rundir.lease import beat_interval

MANIFEST_VERSION = 5  # 5: a prefix-grouped chunk is positions in order.bin (4: jobs/ and attempts/ folders)
CHARS_PER_TOKEN = 4  # rough, tokenizer-free estimate; only relative sizes matter


def estimate_tokens(prompt_chars: int, max_tokens: int, n: int) -> int:
    """A record's tokens, prompt and output, from its prompt's characters (io/data.py counts
    a chat's message contents + 16 a message)."""
    return prompt_chars // CHARS_PER_TOKEN + 1 + max_tokens * n


class ChunkCutter:
    """Decides where chunks end, block by block in input order, so the plan is one
    streaming pass.

    Each chunk targets remaining / (2 * workers) estimated tokens, but never less than
    total / (workers * chunks_per_worker * 2), so the count of chunks stays near
    workers * chunks_per_worker and their sizes shrink towards the end (guided
    self-scheduling). `total` is the caller's estimate of the whole input's tokens as
    known so far; with the exact total this is the classic schedule. Chunks are
    contiguous input ranges, so the merge is a concatenation; balance comes from the
    dynamic claiming of shrinking chunks, not from reordering records (output lengths,
    which dominate, are unknown before the run; bench/balance.py measures the result).
    `max_records` bounds a chunk's length: nothing of a chunk is saved until it finishes,
    so a chunk longer than the job's time limit would restart from zero at every requeue.
    """

    def __init__(self, workers: int, chunks_per_worker: int, max_records: int | None = None):
        self.workers, self.per_worker, self.max_records = workers, chunks_per_worker, max_records or 0
        self.before = 0.0  # estimated tokens in chunks already cut
        self.current, self.count = 0, 0  # the open chunk: tokens and records so far

    def cuts(self, ests: list[int], total: float) -> list[int]:
        """Positions in `ests` after which a chunk ends (a cumulative sum and a bisection per
        chunk, not a Python step per record)."""
        cum = list(itertools.accumulate(ests, initial=0))  # cum[i]: tokens of ests[:i]
        out, start, base = [], 0, cum[0] - self.current  # base: where the open chunk began
        while start < len(ests):
            target = max(1.0, total / (self.workers * self.per_worker * 2), (total - self.before) / (2 * self.workers))
            # first i (>= start) with cum[i + 1] - base >= target
            i = bisect.bisect_left(cum, base + target, lo=start + 1) - 1
            if self.max_records:
                i = min(i, start + self.max_records - self.count - 1)
            if i >= len(ests):
                break
            out.append(i)
            self.before += cum[i + 1] - base
            start, base, self.count = i + 1, cum[i + 1], 0
        self.current = cum[-1] - base
        self.count += len(ests) - start
        return out


def make_chunks(est: list[int], workers: int, chunks_per_worker: int, max_records: int | None = None) -> list[range]:
    """Contiguous chunks for known per-record estimates (the simulation in bench/balance.py)."""
    ends = ChunkCutter(workers, chunks_per_worker, max_records).cuts(est, sum(est))
    chunks, start = [], 0
    for i in ends:
        chunks.append(range(start, i + 1))
        start = i + 1
    if start < len(est):
        chunks.append(range(start, len(est)))
    return chunks


class _ChunkWriter:
    """Copies the input into the run as the scan goes (`input.copy`: the input's bytes, or
    JSON rows for csv/parquet), one sequential file: each chunk is a byte range of it with
    its size and CRC-32 in the manifest (one file, since creating thousands of small files
    cost more than the whole read). A chunk's manifest entry: id, n_records, est_tokens,
    first_index, last_index, offset, bytes, crc32."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.table: list[dict] = []
        self.offset = 0
        self._reset()

    def _reset(self) -> None:
        self.crc, self.bytes, self.first, self.n, self.est, self.max_chars = 0, 0, -1, 0, 0, 0
        self.first_line = 1

    def add(self, first: int, count: int, est: int, max_chars: int = 0, first_line: int = 1) -> None:
        """Records `first` .. `first + count - 1` belong to the open chunk; `first_line`: the
        input line its bytes start at (the line after the previous chunk's last record)."""
        if self.first < 0:
            self.first, self.first_line = first, first_line
        self.n += count
        self.est += est
        self.max_chars = max(self.max_chars, max_chars)

    def write(self, data: bytes) -> None:
        if data:
            self.f.write(data)
            self.crc = zlib.crc32(data, self.crc)
            self.bytes += len(data)

    def close(self, last: int) -> None:
        self.table.append(
            dict(
                id=len(self.table),
                n_records=self.n,
                est_tokens=self.est,
                first_index=self.first,
                last_index=last,
                offset=self.offset,
                bytes=self.bytes,
                crc32=self.crc,
                first_line=self.first_line,
                max_chars=self.max_chars,
            )
        )
        self.offset += self.bytes
        self._reset()

    def finish(self, last: int) -> None:
        if self.n:
            self.close(last)
        else:  # only blank lines after the last record
            self.f.truncate(self.offset)
        self.f.close()


@dataclass
class PlannedInput:
    """The input read once into a private staging directory (`input.copy` + the chunk
    table); `prepare` publishes it as the run directory or, for a resumed run, discards it.
    Discarded unpublished (a later check failed), it leaves nothing behind: not even the
    output_root folders the plan created."""

    staging: Path
    n_records: int
    sha256: str
    size: int
    est_tokens: int
    chunks: list[dict]
    overrides: list[dict]
    created: Path | None = None  # the first folder of output_root that planning created
    input_format: str = ""  # data.format as read (auto resolved)
    spec: Any = None  # io.records.InputSpec the records were checked with
    grouped: dict | None = None  # prefix groups the records were planned in (prefix_groups), or None
    root_fd: int | None = None  # output_root, pinned: `staging` is a path through it (/proc/self/fd/N/...)
    parent: Path | None = None  # output_root as the user named it (messages, and what discard removes)

    def discard(self) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        _remove_empty(self.parent or self.staging.parent, self.created)
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    def __enter__(self) -> "PlannedInput":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()


def plan_input(rc: RunConfig, parallel: bool = True) -> PlannedInput:
    """One streaming pass over data.path: read, hash, check each record, cut chunks and
    write each chunk file as the input's own bytes for its range (copied, so the run never
    depends on the input staying put; ids and templates are applied where a record is
    used, by the same io/records.py). Memory: a few blocks, the chunk table, 8 bytes an id.
    Big inputs are parsed by a few processes while this one reads, hashes and copies
    (`parallel=False`: all in this one)."""
    from ..config import hook_needs

    resolve_source(rc.data, rc.cluster.hf_home, rc.cluster.token_file)  # a Hub set: fetched once, here
    scan = InputScan(rc.data, *hook_needs(rc.postprocess))
    group = rc.data.group_prefixes == "auto" and scan.spec.chunk_encoding == "lines"
    scan.record_crcs = group  # each record's CRC-32, which a grouped chunk's worker checks
    run = RunDir(rc.run_path)
    created = next((p for p in reversed(run.root.parents) if not p.exists()), None)
    run.root.parent.mkdir(parents=True, exist_ok=True)
    # A staging directory of our own (two first launches of one run_name never share one),
    # made and written through output_root's descriptor: whoever can rename entries above it
    # may exchange output_root while we plan, and our input's copy must not follow the path
    # into their folder. `prepare` publishes it by a rename inside that same folder.
    root_fd = os.open(run.root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.root.name}.planning.", dir=fd_path(root_fd)))
    try:
        staging = RunDir(tmp)
        staging.make()
        writer = _ChunkWriter(staging.input_copy)
        cutter = ChunkCutter(rc.cluster.workers, rc.chunks_per_worker, rc.max_chunk_records)
        max_tokens, n = rc.sampling.max_tokens, rc.sampling.n
        rows = scan.spec.chunk_encoding == "rows"
        per_record = estimate_tokens(0, max_tokens, n)
        seen, base = 0, 0  # estimated tokens so far; records in the blocks before this one
        # for prefix grouping, each record's: prefix key, byte range in input.copy, estimate, length,
        # line and CRC-32
        keys, ends, all_ests, chars = array.array("q"), array.array("q"), array.array("q"), array.array("q")
        starts, lines, crcs = array.array("q"), array.array("q"), array.array("q")
        after = 0  # the line of the last record put in a chunk: the next chunk's bytes start after it
        for raw, seg, parsed, left in scan.blocks(parallel=parallel):
            ests = [c // CHARS_PER_TOKEN + per_record for c in parsed.chars]  # estimate_tokens, inlined
            if group:
                block_start = writer.offset + writer.bytes - seg  # where this block's byte 0 lands in input.copy
                keys.extend(parsed.prefixes[: len(ests)])
                for col, offsets in ((ends, parsed.ends), (starts, parsed.starts)):  # vectorized: not a step a record
                    col.frombytes((np.frombuffer(offsets, np.int64)[: len(ests)] + block_start).tobytes())
                crcs.extend(parsed.crcs[: len(ests)])
                all_ests.extend(ests)
                chars.extend(parsed.chars[: len(ests)])
                lines.extend(parsed.record_lines[: len(ests)])
            seen += sum(ests)
            total = seen * (1.0 + left)  # what is read so far, scaled by what is left of the file
            start = 0
            for i in cutter.cuts(ests, total) + [None]:
                stop = len(ests) if i is None else i + 1
                if stop <= start:
                    break
                writer.add(
                    base + start,
                    stop - start,
                    sum(ests[start:stop]),
                    max(parsed.chars[start:stop]),
                    base + start + 1 if rows else after + 1,
                )
                after = parsed.record_lines[stop - 1]
                if rows:
                    writer.write(
                        "".join(
                            json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in parsed.rows[start:stop]
                        ).encode()
                    )
                elif i is not None:
                    writer.write(raw[seg : parsed.ends[i]])
                    seg = parsed.ends[i]
                if i is not None:
                    writer.close(base + i)
                start = stop
            if raw is not None:
                writer.write(raw[seg:])
            base += len(ests)
        writer.finish(base - 1)
        table, grouping = writer.table, None
        if group and len(writer.table) > 1:
            grouping = prefix_groups(keys)
            if grouping is not None:
                columns = {"start": starts, "end": ends, "est": all_ests, "chars": chars, "line": lines, "crc": crcs}
                table = regroup(staging, grouping[0], {k: np.frombuffer(v, np.int64) for k, v in columns.items()}, rc)
        return PlannedInput(
            tmp,
            scan.n,
            scan.sha256,
            scan.size,
            seen,
            table,
            list(scan.overrides.values()),
            created,
            scan.spec.format,
            scan.spec,
            grouping[1] if grouping else None,
            root_fd,
            run.root.parent,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(run.root.parent, created)
        os.close(root_fd)
        raise


def prefix_groups(keys: array.array) -> tuple[np.ndarray, dict] | None:
    """The order to plan records in when records sharing a long prefix are scattered: groups
    in the order their first record appears, records in input order within a group. None
    when grouping would change little: under 10% of the records share a prefix with another,
    or each group already comes in one piece (a grouped input: nothing to gain, no second
    pass paid). Sorting the keys, never comparing records with each other; vectorized, so
    a million records cost a fraction of a second."""
    k = np.frombuffer(keys, dtype=np.int64) if len(keys) else np.zeros(0, np.int64)
    n = len(k)
    if not n:
        return None
    _, first, inverse, size = np.unique(k, return_index=True, return_inverse=True, return_counts=True)
    runs = int(np.count_nonzero(k[1:] != k[:-1])) + 1
    shared = int(size[size > 1].sum())
    if shared < 0.1 * n or runs <= 1.5 * len(first):
        return None
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # groups by first appearance
    order = np.argsort(rank[inverse.reshape(-1)], kind="stable")  # stable: input order within a group
    return order, {
        "groups": len(first),
        "records_in_shared_groups": shared,
        "runs_before": runs,
        "prefix_chars": PREFIX_CHARS,
    }


def published(run: RunDir, staged) -> RunDir:
    """The run just published by rename, checked again: the folder now at its path must be the
    one planned (same inode), not one swapped in by whoever can write its parent between the
    rename and this look. Returns the run on the planned folder's handle."""
    from ..rundir import trust

    now = trust.open_dir(run.root, "run_dir", trust.OWN)
    if now.stat().ino != staged.stat().ino:
        raise UserError(
            f"{run.root}: the folder at this path is not the run just planned (it was replaced right "
            f"after it was published); someone who can write {run.root.parent} may be interfering. "
            f"Nothing was submitted; use an output_root only you can write"
        )
    staged.close()
    return RunDir(run.root, now)


def regroup(staging: RunDir, order: np.ndarray, col: dict[str, np.ndarray], rc: RunConfig) -> list[dict]:
    """Chunks over the records taken in `order`, without moving a byte: a grouped chunk is a
    range of positions in `order.bin`, whose row for each position is the record's original
    index, line, byte range in input.copy and the CRC-32 of those bytes (five little-endian
    int64). A worker reads its records one by one and checks each (rundir/chunks.py); the
    merge restores input order. Rewriting the copy in group order took one positioned read
    a record and a second copy of the input: three reads' worth at a million prompts."""
    cuts = ChunkCutter(rc.cluster.workers, rc.chunks_per_worker, rc.max_chunk_records).cuts(
        col["est"][order].tolist(), float(col["est"].sum())
    )
    his = sorted(set(c + 1 for c in cuts) | {len(order)})
    los = [0] + his[:-1]
    per = {  # each chunk's figures, vectorized over the chunks
        "n": np.diff([0] + his),
        "est": np.add.reduceat(col["est"][order], los),
        "bytes": np.add.reduceat((col["end"] - col["start"])[order], los),
        "max_chars": np.maximum.reduceat(col["chars"][order], los),
        "first": np.minimum.reduceat(order, los),
        "last": np.maximum.reduceat(order, los),
        "first_line": col["line"][order[los]],
    }
    per = {k: v.tolist() for k, v in per.items()}
    table = [
        dict(
            id=c,
            n_records=per["n"][c],
            est_tokens=per["est"][c],
            first_index=per["first"][c],
            last_index=per["last"][c],
            offset=None,  # not one byte range: the records' own ranges are in order.bin
            bytes=per["bytes"][c],
            crc32=None,  # each record's CRC is in order.bin
            first_line=per["first_line"][c],
            max_chars=per["max_chars"][c],
            positions=[lo, hi],
        )
        for c, (lo, hi) in enumerate(zip(los, his))
    ]
    rows = np.column_stack([order] + [col[k][order] for k in ("line", "start", "end", "crc")])
    with open(staging.root / "order.bin", "wb") as f:
        f.write(rows.astype("<i8").tobytes())
    return table


def _remove_empty(folder: Path, created: Path | None) -> None:
    """Remove `folder` and its parents up to `created`, those of them that are empty."""
    if created is None:
        return
    for d in [folder, *folder.parents]:
        try:
            d.rmdir()
        except OSError:
            return
        if d == created:
            return


def input_label(rc: RunConfig) -> str:
    """What the manifest and summary call the input: the file's absolute path, or hf://...@<commit>."""
    source = resolve_source(rc.data)
    return source.label if source.origin.get("hub") else str(Path(rc.data.path).expanduser().resolve())


def fingerprint_parts(rc: RunConfig, input_sha256: str = "", endpoint: dict | None = None) -> dict[str, str]:
    """What decides a run's output. A changed part means a different run. The input part is
    the hash of the bytes the records were parsed from (one pass), never a second read."""

    def h(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    data = OmegaConf.to_container(OmegaConf.structured(rc.data))
    model = OmegaConf.to_container(OmegaConf.structured(rc.model))
    # split/subset only when set: runs planned before they existed keep their fingerprint
    settings = {k: v for k, v in data.items() if k not in ("name", "path", "postprocess")}
    settings = {k: v for k, v in settings.items() if not (k in ("split", "subset") and v is None)}
    origin = resolve_source(rc.data).origin
    return {
        "input file": (input_sha256 or file_fingerprint(Path(rc.data.path).expanduser()))[:16],
        # a Hub set: the commit it was read at (the bytes' hash above decides; this names them)
        **({"input revision": f"{origin['hub']}@{origin['revision']}"} if origin.get("hub") else {}),
        "data settings": h(settings),
        "prompt template": h(load_template(rc.data)),
        "model": h({k: v for k, v in model.items() if k not in ("name",)}),
        "sampling": h(rc.sampling.to_vllm()),
        "seed": str(rc.seed),
        # through served replicas: the served model's name and weights; offline: none. A run
        # resumed through another server (or offline) would mix two models' outputs
        **({"served model": h(endpoint["model"] + "\0" + endpoint["model_path"])} if endpoint else {}),
    }


def _gres_gpus(gres: str | None) -> int:
    """gpu:4, gpu:a100:4 -> 4."""
    if not gres or not gres.startswith("gpu"):
        return 0
    tail = gres.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 1


def tuned_settings(rc: RunConfig) -> dict:
    """The engine settings `hpc-infer tune` kept for this model and cluster ({engine_kwargs,
    path}), when tune.use and there are any. Never part of the run's fingerprint: they change
    how fast, not what (a relaunch after tuning resumes)."""
    if not rc.tune.use or rc.cluster.endpoint or not rc.tuned_path.exists():
        return {}
    from omegaconf import OmegaConf

    from ..rundir import trust

    fix = "turn it off with tune.use=false, or remove the folder and tune again"
    store = trust.open_dir(rc.tuned_path.parent, "the tune store", trust.OWN, fix=fix)  # judged, pinned, no link
    try:
        kept = OmegaConf.to_container(OmegaConf.create(store.read(rc.tuned_path.name).decode())) or {}
    except Exception as e:
        raise UserError(
            f"{rc.tuned_path}: not the settings `hpc-infer tune` writes ({type(e).__name__}); {fix}"
        ) from None
    kwargs = ((kept.get("model") or {}).get("engine_kwargs") or {}) if isinstance(kept, dict) else {}
    unknown = sorted(set(kwargs) - TUNABLE) if isinstance(kwargs, dict) else ["(not a mapping)"]
    if unknown:  # only what tune's grid sets: never trust_remote_code, a path, a plugin
        raise UserError(
            f"{rc.tuned_path}: holds engine settings `hpc-infer tune` never keeps ({', '.join(map(str, unknown))}); "
            f"{fix}"
        )
    return {"engine_kwargs": kwargs, "path": str(rc.tuned_path)} if kwargs else {}


TUNABLE = {"max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "speculative_config"}  # worker/tuner.py


def worker_spec(rc: RunConfig, model_path: str, endpoint: dict | None = None, too_long: dict | None = None) -> dict:
    """Everything a worker needs, as plain JSON. Never holds a secret."""
    m = rc.model
    engine_kwargs: dict[str, Any] = {
        "dtype": m.dtype,
        "tensor_parallel_size": m.tensor_parallel_size,
        "pipeline_parallel_size": m.pipeline_parallel_size,
        "trust_remote_code": m.trust_remote_code,
        "enforce_eager": m.enforce_eager,
        "seed": rc.seed if rc.seed is not None else 0,
    }
    for key in ("max_model_len", "quantization", "gpu_memory_utilization", "revision", "load_format"):
        if getattr(m, key) is not None:
            engine_kwargs[key] = getattr(m, key)
    if rc.cluster.nodes_per_task > 1:
        engine_kwargs["distributed_executor_backend"] = "ray"  # vLLM spans the nodes through Ray
    tuned = tuned_settings(rc)  # what `hpc-infer tune` kept; the user's own engine_kwargs win
    engine_kwargs.update({k: v for k, v in tuned.get("engine_kwargs", {}).items() if k not in m.engine_kwargs})
    engine_kwargs.update(m.engine_kwargs)
    chat_template = Path(m.chat_template).read_text() if m.chat_template else None
    lora = None
    if m.lora_path is not None:
        path = Path(m.lora_path).expanduser().resolve()
        lora = {"path": str(path), "name": path.name, "max_rank": m.lora_max_rank}
    return {
        "model": {
            "path": model_path,
            "task": m.task,
            "engine_kwargs": engine_kwargs,
            "tuned_from": tuned.get("path"),
            "chat_template": chat_template,
            "pair_field": rc.data.pair_field,
            "lora": lora,
            "served_name": m.hf_id or m.name,
            "aliases": [m.name],  # batch lines may name the model by its config name too
            "compile_cache": rc.cluster.compile_cache,
        },  # host/compile_cache.py
        "input": input_spec(rc.data).to_json(),  # how a worker rebuilds records from chunk files
        "sampling": rc.sampling.to_vllm(),
        "seed": rc.seed,
        "batch_defaults": rc.data.batch_defaults,  # OpenAI batch lines: vLLM's server defaults, or the run's
        "env": dict(rc.cluster.env),
        "lease_s": rc.cluster.lease_s,
        "heartbeat_s": beat_interval(rc.cluster.heartbeat_s, rc.cluster.lease_s, rc.cluster.workers),
        "max_chunks_in_flight": rc.cluster.max_chunks_in_flight,
        "max_backups": rc.cluster.max_backups,
        "straggler_pacing": rc.cluster.straggler_pacing,
        "max_attempts": rc.cluster.max_attempts,
        "permissions": rc.permissions,
        # what the merge's figures need without the launcher's config (hpc-infer merge alone)
        "gpus_per_worker": (rc.cluster.gpus_per_task or _gres_gpus(rc.cluster.gres)) * rc.cluster.nodes_per_task
        if rc.cluster.backend == "slurm"
        else 0,
        "too_long": too_long or {},  # index -> {reason[, keep]}: records that cannot fit (models/fit.py)
        "endpoint": endpoint,  # cluster.endpoint resolved: serve run, urls, model name, key FILE (not the key)
    }


def prepare(
    rc: RunConfig,
    planned: PlannedInput,
    model_path: str,
    config_yaml: str,
    endpoint: dict | None = None,
    too_long: dict | None = None,
) -> tuple[RunDir, bool]:
    """Publish the planned input as the run directory (one rename), or check that an
    existing one is the same run. The staging directory is gone afterwards either way.

    Returns the run directory and whether it was resumed.
    """
    run = RunDir(rc.run_path)
    parts = fingerprint_parts(rc, planned.sha256, endpoint)
    try:
        if os.path.lexists(run.root):  # resumed only when nobody else could have written it
            from ..rundir import trust

            trust.check_tree(
                run.root,
                "run_dir",
                trust.OWN,
                SUBDIRS,
                fix="give a run_name of your own (run_name=...), or another output_root",
            )
            for f in (run.manifest, run.worker_spec, run.config):
                if os.path.lexists(f):
                    trust.check(f, "run_dir", trust.OWN, fix="give a run_name of your own (run_name=...)")
        if not run.manifest.exists():
            if run.root.exists() and any(run.root.iterdir()):
                raise UserError(
                    f"{run.root} exists but has no manifest.json (an interrupted plan?); delete it or set run_name=..."
                )
            staging = RunDir(planned.staging)
            write_json(staging.worker_spec, worker_spec(rc, model_path, endpoint, too_long))
            staging.config.write_text(config_yaml)
            write_json(
                staging.manifest,
                {
                    "version": MANIFEST_VERSION,
                    "created": time.time(),
                    "input": input_label(rc),
                    # where the records came from: a Hub repo's commit, subset, split and files; a folder's files
                    "source": {k: v for k, v in resolve_source(rc.data).origin.items() if k != "root"} or None,
                    "n_records": planned.n_records,
                    "input_bytes": planned.size,
                    "n_chunks": len(planned.chunks),
                    "est_tokens": planned.est_tokens,
                    "fingerprint": parts,
                    "chunks": planned.chunks,
                    # prefix groups the records were planned in (run/plan.py: prefix_groups), or None
                    "grouped": planned.grouped,
                },
            )
            from ..rundir import trust
            from ..rundir.fsio import new_run_id

            staged = trust.open_dir(planned.staging, "run_dir", trust.OWN)
            if staged.stat().ino != os.stat(planned.staging).st_ino:  # the handle is the folder we wrote
                raise UserError(
                    f"{run.root.parent}: the folder changed while the run was planned (someone who can "
                    f"write a folder above it may be interfering). Nothing was submitted; use an "
                    f"output_root only you can write"
                )
            new_run_id(staged)  # the run's identity: its jobs refuse a folder swapped in later
            secure_root(planned.staging, rc.permissions, rc.run_group)
            try:
                # the run directory appears whole, or not at all, in the folder we planned in
                os.rename(planned.staging.name, run.root.name, src_dir_fd=planned.root_fd, dst_dir_fd=planned.root_fd)
                return published(run, staged), False
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another launch published this run first: resume it if it is the same run, never mix.
        old = run.read_json("manifest.json")
        if old.get("version") != MANIFEST_VERSION:
            raise UserError(
                f"{run.root} was planned by another hpc_infer version (run format {old.get('version')}, "
                f"this one writes {MANIFEST_VERSION}); merge it with that version, or give a new "
                f"run_name=..."
            )
        was = old.get("fingerprint", {})
        changed = [k for k in dict.fromkeys([*parts, *was]) if was.get(k) != parts.get(k)]
        if changed:
            raise UserError(
                f"{run.root} holds a run made from a different {', '.join(changed)}. "
                f"Resuming it would mix results. Give a new run_name=..., or delete that directory."
            )
        run.make()
        # cluster-side settings may change; what shapes the records (too_long) is the plan's
        write_json(run.worker_spec, worker_spec(rc, model_path, endpoint, too_long))
        from ..rundir import trust
        from ..rundir.fsio import RUN_ID, new_run_id

        fs = trust.open_dir(run.root, "run_dir", trust.OWN)
        if not fs.exists(RUN_ID):  # a run planned before runs had an identity
            new_run_id(fs)
        return RunDir(run.root, fs), True
    finally:
        planned.discard()
