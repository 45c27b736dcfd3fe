"""The run directory: the contract between launcher, workers and merger.

Workers and the merger may run on other machines, so the shared file system is the
bus. This module names every path in it and provides the one write primitive
everything uses (temp file + fsync + rename). Standard library only: it is imported
inside the cluster's vLLM image.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import faults

_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def worker_spec(self) -> Path:
        return self.root / "worker.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def input_copy(self) -> Path:
        """The input's bytes as planned (rows as JSON for csv/parquet); chunk i is the byte
        range manifest["chunks"][i]["offset"] .. + ["bytes"]."""
        return self.root / "input.copy"

    @property
    def claims(self) -> Path:
        return self.root / "claims"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def results(self, fmt: str = "jsonl", partial: bool = False) -> Path:
        """Each format its own file: merges in two formats never replace each other's result."""
        name = "results.partial" if partial else "results"
        return self.root / (f"{name}.openai_batch.jsonl" if fmt == "openai_batch" else f"{name}.{fmt}")

    def claim_path(self, chunk_id: int) -> Path:
        return self.claims / f"{chunk_id:05d}"

    def out_path(self, chunk_id: int) -> Path:
        return self.out / f"{chunk_id:05d}.jsonl"

    def heartbeat_path(self, worker_id: str) -> Path:
        return self.heartbeats / f"{worker_id}.json"

    def make(self) -> None:
        for d in (self.claims, self.out, self.heartbeats, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def done_chunks(self) -> set[int]:
        """Chunk ids with a finished output: exactly `NNNNN.jsonl` (a stray `.bak` copy,
        a temp file or `00001 (copy).jsonl` never counts) whose trailer names that chunk
        and whose size matches the trailer's byte count."""
        return {cid for cid, name in _ids_in(self.out, ".jsonl") if chunk_done(self.out / name, cid)}

    def output_files(self) -> set[int]:
        """Chunk ids with an exactly named output file, checked or not (the merge checks them
        and names any damage)."""
        return {cid for cid, _ in _ids_in(self.out, ".jsonl")}

    def chunk_done(self, chunk_id: int) -> bool:
        return chunk_done(self.out_path(chunk_id), chunk_id)

    def claimed_chunks(self) -> set[int]:
        return {cid for cid, _ in _ids_in(self.claims, "")}


def _ids_in(folder: Path, suffix: str) -> list[tuple[int, str]]:
    """(id, name) for names that are exactly five digits plus `suffix`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    n = 5 + len(suffix)
    return [(int(name[:5]), name) for name in names
            if len(name) == n and name[:5].isdigit() and name[5:] == suffix]


_DONE_CACHE: dict[str, tuple[int, int, bool]] = {}  # path -> (mtime_ns, size, verdict): status polls often


def chunk_done(path: Path, chunk_id: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    key = str(path)
    cached = _DONE_CACHE.get(key)
    if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    try:
        found = read_chunk_trailer(path)
    except OSError:
        return False
    ok = found is not None and found[0].get(TRAILER_KEY) == chunk_id and found[0].get("bytes") == found[1]
    _DONE_CACHE[key] = (st.st_mtime_ns, st.st_size, ok)
    return ok


# permissions setting -> umask for everything a run writes (claims, logs, scripts included)
UMASKS = {"private": 0o077, "group": 0o027}


def current_umask() -> int:
    return _UMASK


def set_permissions(kind: str | None) -> None:
    """Apply the run's permissions to this process (launcher or worker) and its children."""
    global _UMASK
    if kind in UMASKS:
        os.umask(UMASKS[kind])
        _UMASK = UMASKS[kind]


def secure_root(root: Path, kind: str, group: str | None = None) -> None:
    """The run directory itself: 0700 (private) or 2750 owned by `group` (group), else the umask's."""
    if group:
        import shutil

        shutil.chown(root, group=group)
    mode = 0o777 & ~_UMASK
    os.chmod(root, mode | (0o2000 if kind == "group" else 0))
    for sub in ("claims", "out", "heartbeats", "logs"):
        d = root / sub
        if d.is_dir():
            os.chmod(d, mode | (0o2000 if kind == "group" else 0))


def publish_chunk_output(path: Path, chunk_id: int, data: bytes) -> bool:
    """Publish a chunk's output unless a complete one is already there: with backup copies
    (or a taken-over chunk whose first holder was alive after all) the first complete
    output wins and the later one is discarded. A damaged file there is replaced. Returns
    whether ours was published."""
    if chunk_done(path, chunk_id):
        return False
    write_atomic(path, data)
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole file. Never creates
    folders: a run directory deleted under a worker is not brought back piecemeal."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared runs need the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("tmp_written", path)
        os.replace(tmp, path)
        faults.point("renamed", path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def read_heartbeats(run: RunDir) -> list[dict]:
    """Every worker's latest heartbeat (heartbeats/W.json), skipping one being replaced."""
    beats = []
    for path in sorted(run.heartbeats.glob("*.json")):
        try:
            beats.append(read_json(path))
        except (OSError, ValueError):
            continue  # being replaced right now
    return beats


def tail_lines(path: Path | str, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of a log, reading only its last `max_bytes` (a vLLM log grows large)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return (lines[1:] if size > max_bytes else lines)[-n:]  # the first line may be cut


class ChunkSource:
    """A chunk's input bytes and the records rebuilt from them; `origin(k)` gives record
    k's input line (or row) and its row as written, for an error record's errors.jsonl line."""

    def __init__(self, body: bytes, parsed: Any, spec: dict, first_index: int):
        self.body, self.parsed, self.spec, self.first_index = body, parsed, spec, first_index
        self.records: list[dict] = parsed.records

    def origin(self, k: int) -> dict:
        start = self.parsed.ends[k - 1] if k else 0
        raw = self.body[start:self.parsed.ends[k]].decode("utf-8", errors="replace").split("\n")
        text = next((t.rstrip("\r") for t in reversed(raw) if t.strip()), "")
        if self.spec.get("format") == "txt":
            row: Any = {"prompt": text}
        else:
            try:
                row = json.loads(text.lstrip("\ufeff"))
            except ValueError:
                row = {"text": text}
        from ..io.records import LINE_FORMATS

        where = ("line", self.parsed.record_lines[k]) if self.spec.get("format") in LINE_FORMATS \
            else ("row", self.first_index + k + 1)
        return {where[0]: where[1], "input": row}


def read_chunk_source(path: Path, expect: dict, spec: dict) -> ChunkSource:
    """A chunk's records, its bytes checked against the manifest's size and CRC-32, then
    rebuilt from the input's own bytes the way the planner checked them (io/records.py)."""
    from ..io.records import InputSpec, parse_block

    with open(path, "rb") as f:
        f.seek(expect["offset"])
        body = f.read(expect["bytes"])
    if len(body) != expect["bytes"] or zlib.crc32(body) != expect["crc32"]:
        raise RuntimeError(f"{path}: chunk {expect['id']} ({expect['bytes']} bytes at {expect['offset']}) does not "
                           f"match the plan's CRC {expect['crc32']}; the run directory is damaged: delete it and "
                           f"launch again")
    first = int(expect["first_index"])
    parsed = parse_block(InputSpec.from_json(spec), str(path), body, int(expect.get("first_line", 1)) - 1, first, 0,
                         None, keep=True)
    if len(parsed.records) != expect["n_records"]:
        raise RuntimeError(f"{path}: {len(parsed.records)} records where the plan has {expect['n_records']}; the run "
                           f"directory is damaged: delete it and launch again")
    return ChunkSource(body, parsed, spec, first)


def read_chunk_records(run: RunDir, chunk_id: int) -> list[dict]:
    """Chunk `chunk_id`'s input records as a worker sees them (tools and tests)."""
    manifest = read_json(run.manifest)
    return read_chunk_source(run.input_copy, manifest["chunks"][chunk_id],
                             read_json(run.worker_spec)["input"]).records


def read_jsonl(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


# A chunk's output ends with one trailer line describing the lines above it. The merge
# checks the trailer (chunk id, record range, byte count, CRC-32) instead of parsing every
# record, so it runs near `cat` speed and still refuses truncated, edited, duplicated or
# foreign files. The trailer is written in the same atomic rename as the records.
TRAILER_KEY = "_hpc_infer_chunk"


def encode_chunk_output(chunk_id: int, rows: list[dict], **meta: Any) -> bytes:
    """Records (sorted by input index, contiguous) as JSON lines plus the trailer line;
    `meta` (worker, started, finished) feeds the run's timeline."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    trailer = {
        TRAILER_KEY: chunk_id,
        "records": len(rows),
        "first": rows[0]["index"] if rows else None,
        "last": rows[-1]["index"] if rows else None,
        "bytes": len(body),
        "crc32": zlib.crc32(body),
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in rows),
        "output_tokens": sum(int(r.get("output_tokens", 0)) for r in rows),
        **meta,
    }
    errors = [r["error"].get("type", "Error") for r in rows if r.get("error")]
    if errors:  # the merge lists these without parsing the chunks that have none
        trailer["errors"] = len(errors)
        trailer["error_types"] = {t: errors.count(t) for t in sorted(set(errors))}
    return body + (json.dumps(trailer) + "\n").encode()


def read_chunk_trailer(path: Path, tail_bytes: int = 4096) -> tuple[dict, int] | None:
    """A chunk output file's trailer and the byte count of the lines above it, or None
    when the file does not end with a trailer (cut short, or not a worker's output)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        tail = f.read()
    if not tail.endswith(b"}\n"):
        return None
    start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
    try:
        trailer = json.loads(tail[start:])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(trailer, dict) or TRAILER_KEY not in trailer:
        return None
    return trailer, size - (len(tail) - start)
