"""Read a prompt set in one streaming pass: hashed as read, split on "\n" only, every
record checked (io/records.py builds it), memory bounded by a block and
data.max_line_bytes, not by the input's size.

Every problem is reported with the file and line (or row) and the setting to change,
before anything is written or submitted.
"""

from __future__ import annotations

import array
import csv
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import DataConfig
from ..errors import UserError
from .sources import Source
from .sources import resolve as resolve_source
from .records import (
    InputSpec,
    Parsed,
    RecordError,
    apply_template,
    ids_unlike_first,
    line_too_long,
    mixed_kinds,
    parse_block,
    to_record,
)

__all__ = [
    "Record",
    "Records",
    "InputScan",
    "load_records",
    "load_template",
    "input_spec",
    "apply_template",
    "detect_format",
    "file_fingerprint",
]
BLOCK = 1 << 20


@dataclass
class Record:
    index: int  # position in the input; the merge restores this order
    id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # other input fields, kept for scoring
    sampling: dict[str, Any] | None = None  # per-record SamplingParams overrides (OpenAI batch bodies)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "index": self.index}
        if self.messages is not None:
            d["messages"] = self.messages
        else:
            d["prompt"] = self.prompt
        if self.fields:
            d["fields"] = self.fields
        if self.sampling:
            d["sampling"] = self.sampling
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        return cls(
            d["index"],
            d["id"],
            prompt=d.get("prompt"),
            messages=d.get("messages"),
            fields=d.get("fields") or {},
            sampling=d.get("sampling"),
        )


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return "jsonl" if fmt == "json" else fmt
    suffixes = "".join(path.suffixes[-2:]).lower()
    for ext, name in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".txt", "txt"),
        (".arrow", "arrow"),
    ):
        if suffixes.endswith(ext):
            if name == "jsonl" and _looks_like_openai_batch(path):
                return "openai_batch"
            return name
    raise UserError(
        f"{path}: cannot tell the format from the file name; set data.format=jsonl|openai_batch|parquet|csv|txt|arrow"
    )


def _looks_like_openai_batch(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        row = json.loads(first)
    except ValueError:
        return False
    # the batch shape, even when a line lacks custom_id (then reading it names that line)
    return isinstance(row, dict) and ("custom_id" in row or "body" in row) and ("body" in row or "url" in row)


class Records(list):
    """The records of one read of the input, with the SHA-256 and size of exactly the bytes
    that were parsed: the run's fingerprint can never describe other content than its plan."""

    sha256: str = ""
    size: int = 0


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_template(cfg: DataConfig) -> str | None:
    if cfg.template_file:
        return Path(cfg.template_file).expanduser().read_text(encoding="utf-8")
    return cfg.template


def input_spec(cfg: DataConfig) -> InputSpec:
    return InputSpec(
        format=resolve_source(cfg).format,
        id_field=cfg.id_field,
        prompt_field=cfg.prompt_field,
        messages_field=cfg.messages_field,
        system_prompt=cfg.system_prompt,
        template=load_template(cfg),
        template_name=cfg.template_file or "data.template",
        pair_field=cfg.pair_field,
    )


def _parse_rows(spec: InputSpec, path: str, rows: list[tuple[int, Any]], index0: int, kind: str, keep: bool) -> Parsed:
    """csv/parquet rows (number, row) -> Parsed; chunk files get each row as JSON."""
    out = Parsed(rows[0][0] if rows else 0, keep, spec, kind)
    for k, (number, row) in enumerate(rows):
        try:
            rec, has_id = to_record(row, index0 + k, spec)
            out.add(rec, has_id, number, -1)
        except RecordError as e:
            raise UserError(f"{path} {kind} {number}: {e}") from None
    return out


def _fast_loads() -> Any:
    """orjson's parser (2-3x json's at a million lines), or None without it: io/records.py
    tries it first and lets json decide what it refuses (NaN, 1e400, lone surrogates). Only
    for the plan's check of jsonl, which keeps no record: orjson reads an integer beyond 64
    bits as a float, where json keeps it exact, so records that are kept (the worker's, the
    duplicate-id re-read's) and OpenAI batch bodies (whose values are checked) are json's.
    What it could change is a heuristic's input (a token estimate, a prefix key) or an id
    hash, whose clash is only ever decided by that json re-read."""
    try:
        from orjson import loads
    except ImportError:
        return None
    return loads


def _scan_processes(size: int) -> int:
    """Processes that parse blocks while this one reads: none for small inputs (a pool
    costs more than it saves), else up to 4 of the cores this process may use."""
    if size < 16 * BLOCK:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(4, cores) if cores > 1 else 0


# One block of the scan: the raw bytes (whole lines; None for csv/parquet), where the records'
# bytes start in it (after a BOM), what parsing it gave, and how much input is left per unit
# read so far (bytes or rows), for the planner's estimate of the whole.
Block = tuple["bytes | None", int, Parsed, float]


class InputScan:
    """One pass over data.path. Iterate `blocks()`; afterwards `sha256`/`size` describe
    exactly the bytes the records came from, `n` counts them and `overrides` holds the
    distinct per-record sampling overrides (OpenAI batch bodies).

    Ids are checked unique through an array of their 64-bit hashes (8 bytes a record, not
    a dict of strings); only when two hashes meet is the input read again, to name the lines.
    """

    def __init__(self, cfg: DataConfig, needs: tuple[str, ...] = (), needed_by: str = ""):
        import dataclasses

        self.cfg, self.needs, self.needed_by = cfg, needs, needed_by
        self.source: Source = resolve_source(cfg)
        self.path = self.source.label  # what messages name
        self.spec = input_spec(cfg)
        if needs:  # fields the merge hook reads: a record without them is refused now, with its line
            self.spec = dataclasses.replace(self.spec, needs=tuple(needs), needed_by=needed_by)
        self.sha256, self.size, self.n = "", 0, 0
        self.record_crcs = False  # each record's CRC-32 (Parsed.crcs): the planner's, for prefix grouping
        self.overrides: dict[str, dict] = {}
        self._id_hashes = array.array("q")
        self._ids_given: bool | None = None
        self._chat: bool | None = None

    def blocks(self, keep: bool = False, parallel: bool = True) -> Iterator[Block]:
        """`keep`: hold each block's records (load_records); `parallel`: parse big inputs
        in a few processes (the order of blocks, errors and results is the file's)."""
        if self.spec.chunk_encoding == "lines":
            yield from self._line_blocks(keep, parallel)
        else:
            yield from self._row_blocks(keep)
        if not self.n:
            raise UserError(f"{self.path}: no records (empty file?); point data.path at a non-empty prompt set")
        if self._ids_given:
            self._check_unique()

    def _take(self, parsed: Parsed) -> int:
        """Check a block against the blocks before it; returns how many of its records count
        (fewer than all when data.limit ends the input inside it)."""
        if not len(parsed):
            return 0
        if self._ids_given is None:
            self._ids_given, self._chat = parsed.has_id, parsed.chat
        elif parsed.has_id != self._ids_given:
            raise UserError(
                f"{self.path} {parsed.kind} {parsed.first_line}: {ids_unlike_first(parsed.has_id, self.cfg.id_field)}"
            )
        elif parsed.chat != self._chat:
            raise UserError(f"{self.path} {parsed.kind} {parsed.first_line}: {mixed_kinds(self.spec.format)}")
        take = len(parsed)
        if self.cfg.limit:
            take = min(take, self.cfg.limit - self.n)
        self._id_hashes.extend(parsed.hashes[:take] if take < len(parsed) else parsed.hashes)
        self.overrides.update(parsed.overrides)  # (with a limit, overrides past it are checked too: harmless)
        self.n += take
        return take

    def _check_unique(self) -> None:
        import numpy as np

        hashes = np.sort(np.frombuffer(self._id_hashes, dtype=np.int64))
        clash = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        if not clash:
            return
        seen: dict[str, int] = {}  # read again, keeping only the ids whose hashes clash, to name both lines
        again = InputScan(self.cfg, self.needs, self.needed_by)
        for _raw, _seg, parsed, _left in again.blocks(keep=True, parallel=False):
            for k, rec in enumerate(parsed.records):
                if hash(rec["id"]) in clash:
                    first = seen.setdefault(rec["id"], rec["index"])
                    if first != rec["index"]:
                        raise UserError(
                            f"{self.path} {parsed.kind} {parsed.record_lines[k]}: duplicate id "
                            f"'{rec['id']}' (first seen at record {first + 1}); ids must be unique"
                        )

    def _line_blocks(self, keep: bool, parallel: bool) -> Iterator[Block]:
        """jsonl, OpenAI batch, txt: blocks of whole lines, parsed in order (in a few other
        processes for big inputs), then hashed and handed out in file order."""
        path, max_line = self.path, self.cfg.max_line_bytes
        digest = hashlib.sha256()
        with _Chain(self.source.files) as f:
            file_size = max(1, f.size)
            procs = _scan_processes(file_size) if parallel and not keep else 0
            fast = None if keep or self.spec.format != "jsonl" else _fast_loads()
            pool = None
            if procs:
                import multiprocessing

                pool = multiprocessing.get_context("fork").Pool(procs)
            try:
                pending: list = []  # (buf, future or Parsed), oldest first; at most 2 per process
                offset0 = 0
                for buf, line0 in self._raw_blocks(f):
                    args = (
                        self.spec,
                        str(path),
                        buf,
                        line0,
                        self.n if keep else 0,
                        offset0,
                        max_line,
                        keep,
                        offset0 == 0,
                        self.record_crcs,
                        fast,
                    )
                    offset0 += len(buf)
                    pending.append((buf, pool.apply_async(parse_block, args) if pool else parse_block(*args)))
                    while pending and (len(pending) > 2 * procs or not pool):
                        done = yield from self._hand_out(pending.pop(0), digest, file_size)
                        if done:
                            return
                while pending:
                    if (yield from self._hand_out(pending.pop(0), digest, file_size)):
                        return
            finally:
                if pool is not None:
                    pool.terminate()

    def _hand_out(self, item: tuple, digest: Any, file_size: int) -> Iterator[Block]:
        """Check, hash and yield one parsed block; returns True when data.limit ends the input."""
        buf, result = item
        parsed = result if isinstance(result, Parsed) else result.get()
        take = self._take(parsed)
        stop = take < len(parsed) or (self.cfg.limit is not None and self.n >= self.cfg.limit)
        if take < len(parsed):
            buf = buf[: parsed.ends[take - 1]] if take else b""
            parsed.truncate(take)
        elif stop and len(parsed):
            buf = buf[: parsed.ends[-1]]
        digest.update(buf)
        self.size += len(buf)
        self.sha256 = digest.hexdigest()
        left = (file_size - self.size) / max(1, self.size)
        if self.cfg.limit:
            left = min(left, (self.cfg.limit - self.n) / max(1, self.n))
        seg = 3 if self.size == len(buf) and buf.startswith(b"\xef\xbb\xbf") else 0
        yield buf, seg, parsed, max(0.0, left)
        return stop

    def _raw_blocks(self, f: Any) -> Iterator[tuple[bytes, int]]:
        """The file in blocks of whole lines (the last may lack its "\n"), each with the
        count of lines before it; a line longer than data.max_line_bytes stops the read, so
        memory stays bounded."""
        max_line, line_no = self.cfg.max_line_bytes, 0
        carry: list[bytes] = []
        carry_len = 0
        while True:
            data = f.read(BLOCK)
            if not data:
                if carry_len:
                    yield b"".join(carry), line_no
                return
            nl = data.rfind(b"\n")
            if nl < 0:
                carry.append(data)
                carry_len += len(data)
                if carry_len > max_line + 2:
                    raise line_too_long(str(self.path), line_no + 1, max_line)
                continue
            buf = b"".join(carry) + data[: nl + 1]
            carry, carry_len = [data[nl + 1 :]], len(data) - nl - 1
            yield buf, line_no
            line_no += buf.count(b"\n")

    def _row_blocks(self, keep: bool) -> Iterator[Block]:
        """csv, parquet, arrow: rows, 4096 to a block (never across two files, so a message
        names the right one); chunk files get each row as JSON."""
        limit = self.cfg.limit
        digest = _Digest()
        if self.spec.format == "csv":
            if len(self.source.files) != 1:
                raise UserError(f"{self.path}: csv is read from one file; convert the shards to parquet or jsonl")
            path = self.source.files[0]
            rows: Iterator[tuple[int, Any, str]] = (
                (n, row, self.path) for n, row in _csv_rows(_lines(path, self.cfg.max_line_bytes, digest))
            )
            total, kind = max(1, path.stat().st_size), "line"
        else:
            total, rows, kind = self._table_total(), self._table_rows(digest), "row"
        batch: list[tuple[int, Any]] = []
        where = self.path
        for number, row, name in itertools.chain(rows, [(None, None, None)]):
            if batch and (number is None or name != where):
                yield from self._row_block(batch, where, kind, total, digest, last=number is None)
                batch = []
                if limit and self.n >= limit:
                    break
            if number is None:
                break
            where = name
            batch.append((number, row))
            if len(batch) == 4096 or (limit and self.n + len(batch) >= limit):
                yield from self._row_block(batch, where, kind, total, digest, last=False)
                batch = []
                if limit and self.n >= limit:
                    break
        self.sha256, self.size = digest.h.hexdigest(), digest.size

    def _row_block(
        self, batch: list, where: str, kind: str, total: int, digest: "_Digest", last: bool
    ) -> Iterator[Block]:
        limit = self.cfg.limit
        parsed = _parse_rows(self.spec, where, batch, self.n, kind, True)
        parsed.rows = [r for _, r in batch]
        parsed.truncate(self._take(parsed))
        left = 0.0
        if not last:
            done = batch[-1][0] if kind == "row" else max(1, digest.size)
            left = (total - done) / max(1, done)
            if limit:
                left = min(left, (limit - self.n) / max(1, self.n))
        yield None, 0, parsed, max(0.0, left)

    def _table_total(self) -> int:
        """Rows in all the files, from parquet footers or Arrow batch headers (no data read)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        total = 0
        for path in self.source.files:
            try:
                if self.spec.format == "parquet":
                    total += pq.read_metadata(path).num_rows
                else:
                    total += sum(b.num_rows for b in _arrow_batches(pa.memory_map(str(path))))
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"{self.source.name_of(path)}: not a readable {self.spec.format} file ({e})") from None
        return max(1, total)

    def _table_rows(self, digest: "_Digest") -> Iterator[tuple[int, Any, str]]:
        """(row number in the whole set, row, file name) streamed a record batch at a time:
        memory is a batch, not the set. Each file is hashed first, through the same open
        file, then decoded from it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        number = 0
        for path in self.source.files:
            name = self.source.name_of(path)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    digest.update(block)
                f.seek(0)
                try:
                    if self.spec.format == "parquet":
                        batches: Iterator = pq.ParquetFile(f).iter_batches(batch_size=4096)
                    else:
                        batches = _arrow_batches(pa.PythonFile(f, mode="r"))
                    for batch in batches:
                        for row in batch.to_pylist():
                            number += 1
                            yield number, row, name
                except (OSError, pa.ArrowException) as e:
                    raise UserError(f"{name}: not a readable {self.spec.format} file ({e})") from None


def _arrow_batches(source: Any) -> Iterator:
    """The record batches of an Arrow IPC stream (what datasets' save_to_disk writes) or file."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        f = pa.ipc.open_file(source)
        yield from (f.get_batch(i) for i in range(f.num_record_batches))
        return
    yield from reader


class _Chain:
    """The source's files as one stream of lines: a file that does not end with a newline
    gets one before the next file's first line (one file: its bytes as they are)."""

    def __init__(self, files: tuple[Path, ...]):
        self.files = list(files)
        self.size = 0
        self.f: Any = None
        self.last = b"\n"
        self._open_next()
        self.size = sum(os.stat(p).st_size for p in files) + len(files) - 1

    def _open_next(self) -> bool:
        if self.f is not None:
            self.f.close()
            self.f = None
        if not self.files:
            return False
        self.f = open(self.files.pop(0), "rb")
        return True

    def read(self, n: int) -> bytes:
        while self.f is not None:
            data = self.f.read(n)
            if data:
                self.last = data[-1:]
                return data
            if not self._open_next():
                return b""
            if self.last != b"\n":
                self.last = b"\n"
                return b"\n"
        return b""

    def __enter__(self) -> "_Chain":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.f is not None:
            self.f.close()


class _Digest:
    """Counts and hashes every byte as it is read (one pass)."""

    def __init__(self) -> None:
        self.h, self.size = hashlib.sha256(), 0

    def update(self, b: bytes) -> bytes:
        self.h.update(b)
        self.size += len(b)
        return b


def _lines(path: Path, max_line_bytes: int, digest: _Digest) -> Iterator[tuple[int, str]]:
    """(line number, text) per line of a csv file, split on "\n" only, one streaming pass."""
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = digest.update(f.readline(max_line_bytes + 2))
            if not raw:
                return
            line_no += 1
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if body.endswith(b"\r"):
                body = body[:-1]
            if len(body) > max_line_bytes:
                raise line_too_long(str(path), line_no, max_line_bytes)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                offset = digest.size - len(raw) + e.start
                raise UserError(
                    f"{path} line {line_no}: not valid UTF-8 (byte offset {offset}); re-encode the file as UTF-8"
                ) from None
            if line_no == 1 and text.startswith("\ufeff"):  # Excel writes CSV with a BOM: keep the id column's name
                text = text[1:]
            yield line_no, text


def _csv_rows(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    current = [0]

    def texts() -> Iterator[str]:
        for n, text in lines:
            current[0] = n
            yield text + "\n"

    for row in csv.DictReader(texts()):
        yield current[0], row


def load_records(cfg: DataConfig) -> Records:
    """All records in memory (tests, small tools); planning streams through InputScan instead."""
    scan = InputScan(cfg)
    records = Records()
    for _raw, _seg, parsed, _left in scan.blocks(keep=True, parallel=False):
        records.extend(Record.from_json(rec) for rec in parsed.records)
    records.sha256, records.size = scan.sha256, scan.size
    return records
