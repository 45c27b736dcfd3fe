"""One input row -> one record, the same way at planning time and in the worker.

Stdlib only: the worker imports it inside the cluster's image. Chunk files hold the
input's own bytes (jsonl, txt, OpenAI batch) or its rows as JSON (csv, parquet), so the
planner validates every record with `to_record` and discards the result, and the worker
rebuilds the same records from the chunk with the same function: one definition of
ids, templates, system prompts and batch bodies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError

LINE_FORMATS = ("jsonl", "openai_batch", "txt")  # chunk files are byte ranges of the input


class RecordError(ValueError):
    """A record's problem, worded without its location: the reader prefixes file and line
    (formatting a location for every good record would cost more than the check)."""


@dataclass(frozen=True)
class InputSpec:
    """The data settings that shape a record (worker.json's "input")."""

    format: str  # jsonl | openai_batch | txt | csv | parquet
    id_field: str = "id"
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    system_prompt: str | None = None
    template: str | None = None
    template_name: str = "data.template"
    pair_field: str | None = None

    @property
    def chunk_encoding(self) -> str:
        """"lines": a chunk is the input's bytes; "rows": one JSON row per line (csv, parquet)."""
        return "lines" if self.format in LINE_FORMATS else "rows"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(**d)


def apply_template(template: str, prompt: str, row: dict, template_name: str) -> str:
    values = {k: v for k, v in row.items() if isinstance(k, str)}
    values.update(prompt=prompt, question=prompt)
    try:
        return template.format_map(values)
    except KeyError as e:
        raise RecordError(f"template {template_name} uses {{{e.args[0]}}}, which the record does not have "
                          f"(fields: {', '.join(sorted(values))})") from None
    except (ValueError, IndexError) as e:
        raise RecordError(f"template {template_name}: {e}; write literal braces as {{{{ and }}}}") from None


def split_lines(body: bytes) -> list[bytes]:
    """Lines split on b"\\n" only (U+2028, U+0085 and form feed are characters inside a
    record, which str.splitlines() would split on), a trailing "\\r" dropped."""
    lines = body.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_line(text: str, fmt: str) -> Any:
    """A non-blank line of a line format (or a chunk's JSON row) -> its raw row."""
    if fmt == "txt":
        return {"prompt": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None


def to_record(row: Any, index: int, spec: InputSpec, where: str = "") -> tuple[dict, bool]:
    """(record, whether the row gave its own id). The record is what a worker runs and what
    the merge keeps: {id, index, prompt | messages, fields, sampling}. Raises RecordError
    (`where` is used by OpenAI batch bodies only, whose checks name it themselves)."""
    if type(row) is not dict:
        raise RecordError(f"expected a JSON object, got {type(row).__name__}")
    overrides = None
    if spec.format == "openai_batch":
        from .openai_batch import request_to_row

        row, overrides = request_to_row(row, where, spec)
    id_value = row.get(spec.id_field) if spec.id_field else None
    has_id = id_value is not None and id_value != ""
    rec: dict[str, Any] = {"id": str(id_value) if has_id else str(index), "index": index}
    messages = row.get(spec.messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
        ):
            raise RecordError(f"'{spec.messages_field}' must be a non-empty list of {{role, content}} objects")
        if spec.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": spec.system_prompt}] + messages
        rec["messages"] = messages
    elif spec.prompt_field in row:
        prompt = row[spec.prompt_field]
        if type(prompt) is not str:
            raise RecordError(f"'{spec.prompt_field}' must be a string, got {type(prompt).__name__}")
        if not prompt or prompt.isspace():
            raise RecordError(f"'{spec.prompt_field}' is empty; remove the record or fill it in")
        if spec.template:
            prompt = apply_template(spec.template, prompt, row, spec.template_name)
        rec["prompt"] = prompt
    else:
        raise RecordError(f"no '{spec.prompt_field}' or '{spec.messages_field}' field (fields: "
                          f"{', '.join(map(str, row))}); set data.prompt_field=<field> or data.messages_field=<field>")
    if spec.pair_field:
        pair = row.get(spec.pair_field)
        if not isinstance(pair, str) or not pair.strip():
            raise RecordError(f"data.pair_field '{spec.pair_field}' must be a non-empty string (the second text "
                              f"model.task=score compares with)")
    if len(row) > 1 + has_id:  # anything besides the prompt/messages and the id
        fields = dict(row)
        fields.pop(spec.id_field, None)
        fields.pop(spec.prompt_field, None)
        fields.pop(spec.messages_field, None)
        if fields:
            rec["fields"] = fields
    if overrides:
        rec["sampling"] = overrides
    return rec, has_id


def chunk_records(body: bytes, first_index: int, spec: InputSpec, where: str = "chunk") -> list[dict]:
    """A chunk's records, rebuilt exactly as the planner checked them."""
    fmt = spec.format if spec.chunk_encoding == "lines" else "rows"
    records = []
    for n, raw in enumerate(split_lines(body), start=1):
        text = raw.decode("utf-8")  # the planner left out a leading BOM
        if not text or text.isspace():
            continue
        try:
            rec, _ = to_record(parse_line(text, fmt), first_index + len(records), spec, f"{where} line {n}")
        except RecordError as e:
            raise UserError(f"{where} line {n}: {e}") from None
        records.append(rec)
    return records
