"""Plan a run: token-balanced chunks, the run directory and its manifest.

Chunks are cut by estimated tokens, not record counts, and get smaller towards the end
(guided self-scheduling): early chunks amortise claims, late ones keep the tail short,
so the slowest worker does not set the finish time. Chunk 0 is the largest; workers
claim in id order. Each chunk is a contiguous range of the input, so merging is a
checked concatenation. Relaunching with the same input and settings resumes the run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..config import RunConfig
from ..io.data import Record, file_fingerprint, load_template
from ..errors import UserError
from ..worker.rundir import RunDir, read_json, secure_root, write_json

MANIFEST_VERSION = 2  # 2: contiguous chunks, outputs end with a checked trailer
CHARS_PER_TOKEN = 4  # rough, tokenizer-free estimate; only relative sizes matter


def estimate_tokens(record: Record, max_tokens: int, n: int) -> int:
    if record.messages is not None:
        chars = sum(len(str(m.get("content", ""))) for m in record.messages) + 16 * len(record.messages)
    else:
        chars = len(record.prompt or "")
    return chars // CHARS_PER_TOKEN + 1 + max_tokens * n


@dataclass
class Chunk:
    id: int
    n_records: int
    est_tokens: int
    first_index: int
    last_index: int


def make_chunks(est: list[int], workers: int, chunks_per_worker: int, max_records: int | None = None) -> list[range]:
    """Cut the records, in input order, into contiguous chunks whose sizes shrink.

    Each chunk targets remaining / (2 * workers) estimated tokens, but never less than
    total / (workers * chunks_per_worker * 2), so the count of chunks stays near
    workers * chunks_per_worker. Chunks are contiguous input ranges, so the merge is a
    concatenation; balance comes from the dynamic claiming of shrinking chunks, not from
    reordering records (output lengths, which dominate, are unknown before the run;
    bench/balance.py measures the result against static and interleaved slices).
    """
    total = sum(est)
    floor = max(1.0, total / (workers * chunks_per_worker * 2))
    chunks: list[range] = []
    remaining = total
    start = 0
    current_tokens = 0
    target = max(floor, remaining / (2 * workers))
    for i, e in enumerate(est):
        current_tokens += e
        # max_records bounds a chunk's length: nothing of a chunk is saved until it finishes, so a
        # chunk longer than the job's time limit would restart from zero at every requeue
        if current_tokens >= target or (max_records and i + 1 - start >= max_records):
            chunks.append(range(start, i + 1))
            remaining -= current_tokens
            start, current_tokens = i + 1, 0
            target = max(floor, remaining / (2 * workers))
    if start < len(est):
        chunks.append(range(start, len(est)))
    return chunks


def fingerprint_parts(rc: RunConfig, records: list[Record] | None = None) -> dict[str, str]:
    """What decides a run's output. A changed part means a different run. The input part is
    the hash of the bytes the records were parsed from (`Records.sha256`), never a second read."""

    def h(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    data = OmegaConf.to_container(OmegaConf.structured(rc.data))
    model = OmegaConf.to_container(OmegaConf.structured(rc.model))
    return {
        "input file": (getattr(records, "sha256", "") or file_fingerprint(Path(rc.data.path).expanduser()))[:16],
        "data settings": h({k: v for k, v in data.items() if k not in ("name", "path", "postprocess")}),
        "prompt template": h(load_template(rc.data)),
        "model": h({k: v for k, v in model.items() if k not in ("name",)}),
        "sampling": h(rc.sampling.to_vllm()),
        "seed": str(rc.seed),
    }


def worker_spec(rc: RunConfig, model_path: str, endpoint: dict | None = None) -> dict:
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
    for key in ("max_model_len", "quantization", "gpu_memory_utilization", "revision"):
        if getattr(m, key) is not None:
            engine_kwargs[key] = getattr(m, key)
    if rc.cluster.nodes_per_task > 1:
        engine_kwargs["distributed_executor_backend"] = "ray"  # vLLM spans the nodes through Ray
    engine_kwargs.update(m.engine_kwargs)
    chat_template = Path(m.chat_template).read_text() if m.chat_template else None
    lora = None
    if m.lora_path is not None:
        path = Path(m.lora_path).expanduser().resolve()
        lora = {"path": str(path), "name": path.name, "max_rank": m.lora_max_rank}
    return {
        "model": {"path": model_path, "task": m.task, "engine_kwargs": engine_kwargs, "chat_template": chat_template,
                  "pair_field": rc.data.pair_field, "lora": lora, "served_name": m.hf_id or m.name},
        "sampling": rc.sampling.to_vllm(),
        "seed": rc.seed,
        "env": dict(rc.cluster.env),
        "lease_s": rc.cluster.lease_s,
        "heartbeat_s": rc.cluster.heartbeat_s,
        "max_chunks_in_flight": rc.cluster.max_chunks_in_flight,
        "max_backups": rc.cluster.max_backups,
        "permissions": rc.permissions,
        "endpoint": endpoint,  # cluster.endpoint resolved: serve run, urls, model name, key FILE (not the key)
    }


def prepare(rc: RunConfig, records: list[Record], model_path: str, config_yaml: str,
            endpoint: dict | None = None) -> tuple[RunDir, bool]:
    """Create the run directory, or check that an existing one is the same run.

    Returns the run directory and whether it was resumed.
    """
    run = RunDir(rc.run_path)
    parts = fingerprint_parts(rc, records)
    if run.manifest.exists():
        old = read_json(run.manifest)
        if old.get("version") != MANIFEST_VERSION:
            raise UserError(f"{run.root} was planned by an older hpc_infer (run format {old.get('version')}); "
                            f"merge it with that version, or give a new run_name=...")
        changed = [k for k, v in parts.items() if old.get("fingerprint", {}).get(k) != v]
        if changed:
            raise UserError(
                f"{run.root} holds a run made from a different {', '.join(changed)}. "
                f"Resuming it would mix results. Give a new run_name=..., or delete that directory."
            )
        run.make()
        write_json(run.worker_spec, worker_spec(rc, model_path, endpoint))  # cluster-side settings may change
        return run, True
    if run.root.exists() and any(run.root.iterdir()):
        raise UserError(f"{run.root} exists but has no manifest.json (an interrupted plan?); delete it or set run_name=...")
    run.root.parent.mkdir(parents=True, exist_ok=True)
    # A staging directory of our own: two first launches of one run_name never share one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.root.name}.planning.", dir=run.root.parent))
    try:
        staging = RunDir(tmp)
        staging.make()
        _plan_into(staging, rc, records, model_path, config_yaml, parts, endpoint)
        try:
            secure_root(tmp, rc.permissions, rc.run_group)
            os.rename(tmp, run.root)  # the run directory appears whole, or not at all
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another launch published this run first: resume it if it is the same run, never mix.
            shutil.rmtree(tmp, ignore_errors=True)
            return prepare(rc, records, model_path, config_yaml, endpoint)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return run, False


def _plan_into(staging: RunDir, rc: RunConfig, records: list[Record], model_path: str, config_yaml: str,
               parts: dict[str, str], endpoint: dict | None = None) -> None:
    est = [estimate_tokens(r, rc.sampling.max_tokens, rc.sampling.n) for r in records]
    groups = make_chunks(est, rc.cluster.workers, rc.chunks_per_worker, rc.max_chunk_records)
    table = []
    for cid, idx in enumerate(groups):
        # Written straight into the private staging directory (published whole by one rename),
        # without a per-file fsync: the manifest keeps each chunk's size and CRC-32 and the worker
        # checks them on read, so a chunk file damaged by a crash is caught, never trusted.
        body = "".join(json.dumps(records[i].to_json(), ensure_ascii=False) + "\n" for i in idx).encode()
        with open(staging.chunk_path(cid), "wb") as f:
            f.write(body)
        table.append(dict(asdict(Chunk(cid, len(idx), sum(est[i] for i in idx), idx.start, idx.stop - 1)),
                          bytes=len(body), crc32=zlib.crc32(body)))
    write_json(staging.worker_spec, worker_spec(rc, model_path, endpoint))
    staging.config.write_text(config_yaml)
    write_json(
        staging.manifest,
        {
            "version": MANIFEST_VERSION,
            "created": time.time(),
            "input": str(Path(rc.data.path).expanduser().resolve()),
            "n_records": len(records),
            "input_bytes": getattr(records, "size", None),
            "n_chunks": len(groups),
            "est_tokens": sum(est),
            "fingerprint": parts,
            "chunks": table,
        },
    )

