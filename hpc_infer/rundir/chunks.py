"""A chunk's input (a byte range of input.copy, checked by CRC) and its output (records
plus one trailer line, published once). Standard library only."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from .fsio import Dir, Stat

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
    cached = [int(r["cached_tokens"]) for r in rows if r.get("cached_tokens") is not None]
    if cached:  # vLLM's prefix-cache hits (the offline engine reports them; a served replica does not)
        trailer["cached_tokens"] = sum(cached)
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
    return parse_trailer(tail, size)


def trailer_in(fs: Dir, name: str, tail_bytes: int = 4096, st: Stat | None = None) -> tuple[dict, int] | None:
    """read_chunk_trailer through a run's handle; `st`: the caller's stat of it, if it has
    one (the launcher's progress poll: one stat a file, not two)."""
    st = st if st is not None else fs.stat(name)
    if st is None:
        raise FileNotFoundError(fs.where(name))
    return parse_trailer(fs.read_at(name, max(0, st.size - tail_bytes), tail_bytes), st.size)


def parse_trailer(tail: bytes, size: int) -> tuple[dict, int] | None:
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


_DONE_CACHE: dict[str, tuple[int, float, int, bool]] = {}  # file -> (inode, mtime, size, verdict): status polls often


def chunk_done(fs: Dir, name: str, chunk_id: int) -> bool:
    st = fs.stat(name)
    if st is None:
        return False
    key = fs.where(name)
    cached = _DONE_CACHE.get(key)
    if cached and cached[:3] == (st.ino, st.mtime, st.size):
        return cached[3]
    try:
        found = trailer_in(fs, name, st=st)
    except OSError:
        return False
    ok = found is not None and found[0].get(TRAILER_KEY) == chunk_id and found[0].get("bytes") == found[1]
    _DONE_CACHE[key] = (st.ino, st.mtime, st.size, ok)
    return ok


def publish_chunk_output(fs: Dir, name: str, chunk_id: int, data: bytes) -> bool:
    """Publish a chunk's output unless one is already there: with backup copies (or a
    taken-over chunk whose first holder was alive after all) exactly one complete output
    wins (`Dir.publish`: link(), never a check-then-replace that two finishers could both
    pass), and the later one is discarded. A file there that was read and found damaged is
    set aside first (`set_aside`: only that file, never a fresh one another copy published
    since), then ours is offered again; one that could not be read now (EIO, ESTALE) is left
    as it is and ours discarded: a transient error never replaces a published output (the
    next launch sets aside one that is really damaged). Returns whether ours was published.
    tests/test_publish_races.py runs two copies through every interleaving of these calls."""
    if fs.publish(name, data):
        return True
    try:
        st = fs.stat(name)
        found = trailer_in(fs, name, st=st) if st is not None else None
    except OSError:
        return False
    if st is None or (
        found is not None and found[0].get(TRAILER_KEY) == chunk_id and found[0].get("bytes") == found[1]
    ):
        return False
    set_aside(fs, name, st)
    return fs.publish(name, data)


def grave_of(name: str, judged: Stat) -> str:
    """The name a damaged file is set aside under: made of its identity, so one caller of all
    who judged the same file makes it."""
    folder, _, base = name.rpartition("/")
    grave = f".{base}.damaged-{judged.ino}-{judged.size}-{int(judged.mtime * 1e6)}"
    return f"{folder}/{grave}" if folder else grave


def set_aside(fs: Dir, name: str, judged: Stat) -> bool:
    """Move the damaged file `judged` (its stat when it was read) out of `name`, and only it:
    a rename would move whatever is there by then (another copy may have set the damaged one
    aside and published its own output meanwhile, which a second rename would then hide).
    So the file is first linked to a name made of its identity (link never replaces: of all
    who judged the same file, one makes that name), checked to be the judged file, and only
    then unlinked from `name`. Returns whether this caller set it aside.

    A caller that dies between the link and the unlink, or whose link's reply is lost (its
    retry sees EEXIST, and which of the judges made the name cannot be told: they all link
    the same file), leaves the file under both names: no later caller unlinks `name` then,
    since only the maker of `grave_of(...)` may (two unlinkers could remove a fresh output
    published between them). The launcher says so (launch.set_aside_damaged)."""
    grave = grave_of(name, judged)
    try:
        fs.link(name, grave)
    except (FileExistsError, FileNotFoundError):
        return False  # another caller is setting it aside (or stopped halfway), or it is gone
    moved = fs.stat(grave)
    if moved is None or moved.ino != judged.ino:
        try:
            fs.unlink(grave)  # not the judged file: another copy's output, left where it is
        except FileNotFoundError:
            pass
        return False
    try:
        fs.unlink(name)
    except FileNotFoundError:
        pass
    return True


class ChunkSource:
    """A chunk's input bytes and the records rebuilt from them; `origin(k)` gives record
    k's input line (or row) and its row as written, for an error record's errors.jsonl line."""

    def __init__(self, body: bytes, parsed: Any, spec: dict, first_index: int):
        self.body, self.parsed, self.spec, self.first_index = body, parsed, spec, first_index
        self.records: list[dict] = parsed.records
        # a record's position in the chunk by its index (a prefix-grouped chunk's indices are
        # not one contiguous range)
        self._position = {r["index"]: k for k, r in enumerate(self.records)}

    def position(self, index: int) -> int:
        return self._position[index]

    def origin(self, k: int) -> dict:
        start = self.parsed.ends[k - 1] if k else 0
        raw = self.body[start : self.parsed.ends[k]].decode("utf-8", errors="replace").split("\n")
        text = next((t.rstrip("\r") for t in reversed(raw) if t.strip()), "")
        if self.spec.get("format") == "txt":
            row: Any = {"prompt": text}
        else:
            try:
                row = json.loads(text.lstrip("\ufeff"))
            except ValueError:
                row = {"text": text}
        from ..io.records import LINE_FORMATS

        where = (
            ("line", self.parsed.record_lines[k])
            if self.spec.get("format") in LINE_FORMATS
            else ("row", self.first_index + k + 1)
        )
        return {where[0]: where[1], "input": row}


def read_chunk_source(fs: Dir, expect: dict, spec: dict, name: str = "input.copy") -> ChunkSource:
    """A chunk's records, its bytes checked against the manifest's size and CRC-32 (a
    prefix-grouped chunk: each record's against order.bin), then rebuilt from the input's
    own bytes the way the planner checked them (io/records.py)."""
    from ..io.records import InputSpec, parse_block

    path = fs.where(name)
    first = int(expect["first_index"])
    positions = expect.get("positions")  # a prefix-grouped chunk: its records' rows in order.bin
    rows = read_order(fs, *positions) if positions else []
    if positions:
        body = _grouped_body(fs, name, rows, expect["id"])
    else:
        body = fs.read_at(name, expect["offset"], expect["bytes"])
        if len(body) != expect["bytes"] or zlib.crc32(body) != expect["crc32"]:
            raise RuntimeError(
                f"{path}: chunk {expect['id']} ({expect['bytes']} bytes at {expect['offset']}) does not "
                f"match the plan's CRC {expect['crc32']}; the run directory is damaged: delete it and "
                f"launch again"
            )
    parsed = parse_block(
        InputSpec.from_json(spec), path, body, int(expect.get("first_line", 1)) - 1, first, 0, None, keep=True
    )
    if len(parsed.records) != expect["n_records"]:
        raise RuntimeError(
            f"{path}: {len(parsed.records)} records where the plan has {expect['n_records']}; the run "
            f"directory is damaged: delete it and launch again"
        )
    for k, row in enumerate(rows):  # each record its own index, positional id and line back
        rec = parsed.records[k]
        if not parsed.has_id:  # a positional id: the record's own position in the input
            rec["id"] = str(row[0])
        rec["index"] = row[0]
        parsed.record_lines[k] = row[1]
    return ChunkSource(body, parsed, spec, first)


ORDER_ROW = 5  # int64s an order.bin row: original index, line, start and end in input.copy, CRC-32


def read_order(fs: Dir, start: int, stop: int) -> list[tuple[int, ...]]:
    """The order.bin rows of positions start..stop-1 of a prefix-grouped plan (run/plan.py:
    regroup): (original index, line, start, end, CRC-32) each."""
    import array

    values = array.array("q")
    values.frombytes(fs.read_at("order.bin", start * 8 * ORDER_ROW, (stop - start) * 8 * ORDER_ROW))
    return [tuple(values[i : i + ORDER_ROW]) for i in range(0, len(values), ORDER_ROW)]


def _grouped_body(fs: Dir, name: str, rows: list[tuple[int, ...]], chunk_id: int) -> bytes:
    """A prefix-grouped chunk's records as one body in chunk order, read one by one from
    input.copy (in file order) and each checked against its size and CRC-32; a record without
    its newline (the input's last line) gets one, since it no longer ends the body."""
    parts = [b""] * len(rows)
    order = sorted(range(len(rows)), key=lambda k: rows[k][2])
    found = fs.read_ranges(name, [(rows[k][2], rows[k][3] - rows[k][2]) for k in order])
    for k, data in zip(order, found):
        index, _line, a, b, crc = rows[k]
        if len(data) != b - a or zlib.crc32(data) != crc:
            raise RuntimeError(
                f"{fs.where(name)}: record {index} of chunk {chunk_id} ({b - a} bytes at {a}) does not match "
                f"the plan's CRC {crc}; the run directory is damaged: delete it and launch again"
            )
        parts[k] = data if data.endswith(b"\n") else data + b"\n"
    return b"".join(parts)
