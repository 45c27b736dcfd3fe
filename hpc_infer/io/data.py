"""Read a prompt set into records with stable ids, templates applied.

Every problem is reported with the file and line (or row) and the setting to change,
before anything is written or submitted.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import DataConfig
from ..errors import UserError


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


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return "jsonl" if fmt == "json" else fmt
    suffixes = "".join(path.suffixes[-2:]).lower()
    for ext, name in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".csv", "csv"), (".txt", "txt")):
        if suffixes.endswith(ext):
            if name == "jsonl" and _looks_like_openai_batch(path):
                return "openai_batch"
            return name
    raise UserError(f"{path}: cannot tell the format from the file name; "
                    f"set data.format=jsonl|openai_batch|parquet|csv|txt")


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


class _Digest:
    """Counts and hashes every byte as it is read (one pass)."""

    def __init__(self) -> None:
        self.h, self.size = hashlib.sha256(), 0

    def update(self, b: bytes) -> bytes:
        self.h.update(b)
        self.size += len(b)
        return b


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lines(path: Path, max_line_bytes: int, digest: _Digest) -> Iterator[tuple[int, str]]:
    """(line number, text) per line, split on "\n" only (not on U+2028, U+0085, form feed:
    those are characters inside a record), in one streaming pass: memory stays bounded by
    data.max_line_bytes however long a broken line is. A leading BOM is dropped."""
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
                raise UserError(f"{path} line {line_no}: longer than data.max_line_bytes={max_line_bytes} bytes (reading "
                                f"stopped there); a broken file (missing newlines?), or raise data.max_line_bytes")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                offset = digest.size - len(raw) + e.start
                raise UserError(f"{path} line {line_no}: not valid UTF-8 (byte offset {offset}); re-encode the file "
                                f"as UTF-8") from None
            if line_no == 1 and text.startswith("\ufeff"):  # Excel and some editors start files with a BOM
                text = text[1:]
            yield line_no, text


def _rows(path: Path, fmt: str, max_line_bytes: int, digest: _Digest) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, raw row) pairs; line numbers are 1-based."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open(path, "rb") as f:
            raw = digest.update(f.read())
        try:
            table = pq.read_table(pa.BufferReader(raw))
        except Exception as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    lines = _lines(path, max_line_bytes, digest)
    if fmt == "txt":
        for i, line in lines:
            if line.strip():
                yield i, {"prompt": line}
    elif fmt == "csv":
        numbered = iter(lines)
        current = [0]

        def texts() -> Iterator[str]:
            for n, text in numbered:
                current[0] = n
                yield text + "\n"

        for row in csv.DictReader(texts()):
            yield current[0], row
    else:
        for i, line in lines:
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i}: invalid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None


def load_template(cfg: DataConfig) -> str | None:
    if cfg.template_file:
        return Path(cfg.template_file).expanduser().read_text(encoding="utf-8")
    return cfg.template


def apply_template(template: str, prompt: str, row: dict, where: str, template_name: str) -> str:
    values = {k: v for k, v in row.items() if isinstance(k, str)}
    values.update(prompt=prompt, question=prompt)
    try:
        return template.format_map(values)
    except KeyError as e:
        raise UserError(f"{where}: template {template_name} uses {{{e.args[0]}}}, which the record does not have "
                        f"(fields: {', '.join(sorted(values))})") from None
    except (ValueError, IndexError) as e:
        raise UserError(f"template {template_name}: {e}; write literal braces as {{{{ and }}}}") from None


def load_records(cfg: DataConfig) -> Records:
    path = Path(cfg.path).expanduser()
    fmt = detect_format(path, cfg.format)
    template = load_template(cfg)
    template_name = cfg.template_file or "data.template"
    records = Records()
    digest = _Digest()
    seen: dict[str, int] = {}
    ids_given: bool | None = None
    for line, row in _rows(path, fmt, cfg.max_line_bytes, digest):
        where = f"{path} {'row' if fmt == 'parquet' else 'line'} {line}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        overrides = None
        if fmt == "openai_batch":
            from .openai_batch import request_to_row

            row, overrides = request_to_row(row, where, cfg)
        index = len(records)
        has_id = bool(cfg.id_field) and row.get(cfg.id_field) not in (None, "")
        if ids_given is None:
            ids_given = has_id
        elif has_id != ids_given:
            raise UserError(f"{where}: {'has' if has_id else 'has no'} '{cfg.id_field}' field unlike the first record; "
                            f"give every record an id, or none (then ids are derived from positions)")
        rid = str(row[cfg.id_field]) if has_id else str(index)
        if rid in seen:
            raise UserError(f"{where}: duplicate id '{rid}' (first seen at record {seen[rid] + 1}); ids must be unique")
        seen[rid] = index
        fields = {k: v for k, v in row.items() if k not in (cfg.id_field, cfg.prompt_field, cfg.messages_field)}
        if cfg.messages_field in row and row[cfg.messages_field] is not None:
            messages = row[cfg.messages_field]
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
            ):
                raise UserError(f"{where}: '{cfg.messages_field}' must be a non-empty list of {{role, content}} objects")
            if cfg.system_prompt and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": cfg.system_prompt}] + messages
            records.append(Record(index, rid, messages=messages, fields=fields, sampling=overrides))
        elif cfg.prompt_field in row:
            prompt = row[cfg.prompt_field]
            if not isinstance(prompt, str):
                raise UserError(f"{where}: '{cfg.prompt_field}' must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                raise UserError(f"{where}: '{cfg.prompt_field}' is empty; remove the record or fill it in")
            if template:
                prompt = apply_template(template, prompt, row, where, template_name)
            records.append(Record(index, rid, prompt=prompt, fields=fields, sampling=overrides))
        else:
            raise UserError(
                f"{where}: no '{cfg.prompt_field}' or '{cfg.messages_field}' field (fields: {', '.join(map(str, row))}); "
                f"set data.prompt_field=<field> or data.messages_field=<field>"
            )
        if cfg.pair_field:
            pair = row.get(cfg.pair_field)
            if not isinstance(pair, str) or not pair.strip():
                raise UserError(f"{where}: data.pair_field '{cfg.pair_field}' must be a non-empty string "
                                f"(the second text model.task=score compares with)")
        if cfg.limit and len(records) >= cfg.limit:
            break
    # exactly the bytes the records came from (with data.limit: up to the last one read)
    records.sha256, records.size = digest.h.hexdigest(), digest.size
    if not records:
        raise UserError(f"{path}: no records (empty file?); point data.path at a non-empty prompt set")
    kinds = {r.messages is None for r in records}
    if len(kinds) > 1:
        if fmt == "openai_batch":
            raise UserError(f"{path}: mixes /v1/chat/completions and /v1/completions requests; one batch file holds "
                            f"one endpoint (as OpenAI's Batch API requires): split it into two files and run both")
        raise UserError(f"{path}: mixes plain prompts and chat messages; split it into two data sets")
    return records
