"""Input bytes -> records, the same way at planning time and in the worker.

Stdlib only: the worker imports it inside the cluster's image. Chunks hold the input's
own bytes (jsonl, txt, OpenAI batch) or its rows as JSON (csv, parquet), so the planner
checks every line with `parse_block` / `to_record` and keeps only what planning needs,
and the worker rebuilds its chunk's records with the same two functions: one definition
of line splitting, ids, templates, system prompts and batch bodies.
"""

from __future__ import annotations

import array
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError

LINE_FORMATS = ("jsonl", "openai_batch", "txt")  # chunk files are byte ranges of the input


class RecordError(ValueError):
    """A record's problem, worded without its location: the reader prefixes file and line
    (formatting a location for every good record would cost more than the check)."""


class RecordAt(RecordError):
    """A RecordError of the `at`-th record of a batch (Parsed.add_all)."""

    def __init__(self, at: int, msg: str):
        super().__init__(msg)
        self.at = at


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
    needs: tuple = ()  # fields every record must carry (the merge hook's, e.g. r1_zero_reward's answer)
    needed_by: str = ""

    @property
    def chunk_encoding(self) -> str:
        """ "lines": a chunk is the input's bytes; "rows": one JSON row per line (csv, parquet)."""
        return "lines" if self.format in LINE_FORMATS else "rows"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        d = dict(d)
        d["needs"] = tuple(d.get("needs") or ())
        return cls(**d)


def apply_template(template: str, prompt: str, row: dict, template_name: str) -> str:
    values = {k: v for k, v in row.items() if isinstance(k, str)}
    values.update(prompt=prompt, question=prompt)
    try:
        return template.format_map(values)
    except KeyError as e:
        raise RecordError(
            f"template {template_name} uses {{{e.args[0]}}}, which the record does not have "
            f"(fields: {', '.join(sorted(values))})"
        ) from None
    except (ValueError, IndexError) as e:
        raise RecordError(f"template {template_name}: {e}; write literal braces as {{{{ and }}}}") from None


def to_record(row: Any, index: int, spec: InputSpec, where: str = "", fields: bool = True) -> tuple[dict, bool]:
    """(record, whether the row gave its own id). The record is what a worker runs and what
    the merge keeps: {id, index, prompt | messages, fields, sampling}. Raises RecordError
    (`where` is used by OpenAI batch bodies only, whose checks name it themselves; `fields`
    False: the planner's check, which keeps no record, skips copying the other fields)."""
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
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
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
        raise RecordError(
            f"no '{spec.prompt_field}' or '{spec.messages_field}' field (fields: "
            f"{', '.join(map(str, row))}); set data.prompt_field=<field> or data.messages_field=<field>"
        )
    if spec.pair_field:
        pair = row.get(spec.pair_field)
        if not isinstance(pair, str) or not pair.strip():
            raise RecordError(
                f"data.pair_field '{spec.pair_field}' must be a non-empty string (the second text "
                f"model.task=score compares with)"
            )
    for name in spec.needs:
        if row.get(name) is None:
            raise RecordError(
                f"no '{name}' field, which {spec.needed_by} needs at merge; add it to every record, "
                f"point the hook at another field, or turn the hook off (merge.postprocess={{}})"
            )
    if fields and len(row) > 1 + has_id:  # anything besides the prompt/messages and the id
        fields = dict(row)
        fields.pop(spec.id_field, None)
        fields.pop(spec.prompt_field, None)
        fields.pop(spec.messages_field, None)
        if fields:
            rec["fields"] = fields
    if overrides:
        rec["sampling"] = overrides
    return rec, has_id


# Records whose prompts (template applied; a chat's messages joined) agree on their first
# PREFIX_CHARS characters share a long prefix: the planner may group them (run/plan.py).
PREFIX_CHARS = 1024


class Parsed:
    """What one block of input gave: per record its prompt's length in characters (the
    planner's token estimate), its byte end in the block and its id's 64-bit hash, plus
    what the block's records agree on. Small and picklable: blocks can be parsed in other
    processes while this one reads, hashes and copies."""

    def __init__(self, first_line: int, keep: bool, spec: InputSpec, kind: str = "line"):
        self.spec, self.kind = spec, kind
        self.first_line = first_line  # line (or row) number of the block's first record
        self.record_lines = array.array("q")  # each record's line (or row)
        self.rows: list | None = None  # csv/parquet: the raw rows, copied into the run as JSON
        self.chars, self.ends, self.hashes = array.array("q"), array.array("q"), array.array("q")
        self.starts = array.array("q")  # where each record's own line starts in the block
        self.crcs = array.array("q")  # with `record_crcs`: the CRC-32 of each record's bytes (start to end)
        self.prefixes = array.array("q")  # hash of each prompt's first PREFIX_CHARS characters
        self.has_id: bool | None = None
        self.chat: bool | None = None
        self.overrides: dict[str, dict] = {}
        self.records: list[dict] | None = [] if keep else None

    def add(self, rec: dict, has_id: bool, line: int, end: int) -> None:
        self.add_all([rec], [has_id], [line], [end], [-1])

    def add_all(
        self, recs: list[dict], has_ids: list[bool], lines: list[int], ends: list[int], starts: list[int]
    ) -> None:
        """A block's records at once (list comprehensions, not a method call a record: the
        planner's cost at a million prompts). Raises RecordAt for the first record that
        differs from the block's first in having an id or being a chat."""
        if not recs:
            return
        if self.has_id is None:
            self.has_id, self.chat, self.first_line = has_ids[0], "messages" in recs[0], lines[0]
        prompts = [r.get("prompt") for r in recs]
        bad_id = has_ids.index(not self.has_id) if (not self.has_id) in has_ids else len(recs)
        bad_kind = (
            (next((k for k, p in enumerate(prompts) if p is not None), len(recs)))
            if self.chat
            else (prompts.index(None) if None in prompts else len(recs))
        )
        if bad_id < len(recs) or bad_kind < len(recs):
            k = min(bad_id, bad_kind)
            self.add_all(recs[:k], has_ids[:k], lines[:k], ends[:k], starts[:k])
            raise RecordAt(
                k, ids_unlike_first(has_ids[k], self.spec.id_field) if k == bad_id else mixed_kinds(self.spec.format)
            )
        if self.chat:
            heads = ["\n".join(str(m.get("content", "")) for m in r["messages"]) for r in recs]
            self.chars.extend(
                [sum(len(str(m.get("content", ""))) for m in r["messages"]) + 16 * len(r["messages"]) for r in recs]
            )
        else:
            heads = prompts
            self.chars.extend([len(p) for p in prompts])
        self.prefixes.extend([hash(h[:PREFIX_CHARS]) for h in heads])
        self.ends.extend(ends)
        self.starts.extend(starts)
        if self.has_id:
            self.hashes.extend([hash(r["id"]) for r in recs])
        for r in recs:
            if "sampling" in r:
                self.overrides.setdefault(json.dumps(r["sampling"], sort_keys=True), r["sampling"])
        self.record_lines.extend(lines)
        if self.records is not None:
            self.records.extend(recs)

    def __len__(self) -> int:
        return len(self.ends)

    def truncate(self, take: int) -> None:
        """Keep the first `take` records (data.limit ends the input inside this block)."""
        self.chars, self.ends, self.record_lines = self.chars[:take], self.ends[:take], self.record_lines[:take]
        self.starts, self.crcs = self.starts[:take], self.crcs[:take]
        if self.records is not None:
            self.records = self.records[:take]
        if self.rows is not None:
            self.rows = self.rows[:take]


def line_too_long(path: str, line: int, max_line: int) -> UserError:
    return UserError(
        f"{path} line {line}: longer than data.max_line_bytes={max_line} bytes (reading stopped there); "
        f"a broken file (missing newlines?), or raise data.max_line_bytes"
    )


def ids_unlike_first(has_id: bool, id_field: str) -> str:
    return (
        f"{'has' if has_id else 'has no'} '{id_field}' field unlike the first record; give every record an "
        f"id, or none (then ids are derived from positions)"
    )


def mixed_kinds(fmt: str) -> str:
    if fmt == "openai_batch":
        return (
            "mixes /v1/chat/completions and /v1/completions requests; one batch file holds one endpoint (as "
            "OpenAI's Batch API requires): split it into two files and run both"
        )
    return "mixes plain prompts and chat messages; split it into two data sets"


def _add_before(out: Parsed, path: str, recs: list, has_ids: list, numbers: list, ends: list, starts: list) -> None:
    try:
        out.add_all(recs, has_ids, numbers, ends, starts)
    except RecordAt as e:
        raise UserError(f"{path} line {numbers[e.at]}: {e}") from None


def parse_block(
    spec: InputSpec,
    path: str,
    buf: bytes,
    line0: int,
    index0: int,
    offset0: int,
    max_line: int | None,
    keep: bool,
    bom: bool = False,
    record_crcs: bool = False,
    fast_loads: Any = None,
) -> Parsed:
    """Whole lines of a line format (or a chunk's JSON rows) -> Parsed: the one line parser,
    for the planner's blocks and the worker's chunks. `line0`: lines before the block;
    `index0`: records before it (positional ids; only exact when `keep`); `offset0`: its
    offset in `path`; `bom`: the block starts the file (a leading BOM is not text);
    `record_crcs`: each record's CRC-32 too (a prefix-grouped plan's workers read records
    one by one, so each is checked on its own); `fast_loads`: a faster JSON parser tried
    first (the planner's orjson: this module stays stdlib-only for the worker), whose
    refusals json decides, so what is accepted and every error are json's."""
    try:
        text = buf.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line0 + buf.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path} line {line}: not valid UTF-8 (byte offset {offset0 + e.start}); re-encode the file as UTF-8"
        ) from None
    lines = text.split("\n")  # "\n" only: U+2028, U+0085 and form feed stay inside a record
    if not lines[-1]:
        lines.pop()
    out = Parsed(line0 + 1, keep, spec)
    end = 0
    if bom and text.startswith("\ufeff"):  # Excel and some editors start files with a BOM
        lines[0] = lines[0][1:]
        end = 3
    if max_line is not None and max_line < len(buf):
        for i, line in enumerate(lines):
            if len(line) > max_line // 4 and len(line.encode()) - line.endswith("\r") > max_line:
                raise line_too_long(path, line0 + i + 1, max_line)
    ascii_only, cr, txt = text.isascii(), "\r" in text, spec.format == "txt"
    batch = spec.format == "openai_batch"
    loads = json.JSONDecoder().decode  # json.loads without its per-call wrapper
    fast = fast_loads if not txt else None
    index, n_buf = index0, len(buf)
    recs: list[dict] = []
    has_ids: list[bool] = []
    numbers: list[int] = []
    ends: list[int] = []
    starts: list[int] = []
    for i, line in enumerate(lines):
        start = end
        end += (len(line) if ascii_only else len(line.encode())) + 1
        if cr and line.endswith("\r"):
            line = line[:-1]
        if not line or line.isspace():  # a blank line (str.strip() would copy every line)
            continue
        try:
            if txt:
                row = {"prompt": line}
            else:
                try:
                    row = fast(line) if fast else loads(line)
                except ValueError:  # orjson.JSONDecodeError is one
                    try:
                        row = loads(line)  # what orjson refuses (NaN, big integers, lone surrogates) json may take
                    except ValueError as e:
                        raise RecordError(
                            f"invalid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')}); "
                            f"fix or remove the line"
                        ) from None
            rec, has_id = to_record(row, index, spec, f"{path} line {line0 + i + 1}" if batch else "", keep)
        except RecordError as e:
            _add_before(out, path, recs, has_ids, numbers, ends, starts)  # a record before this one may be wrong first
            raise UserError(f"{path} line {line0 + i + 1}: {e}") from None
        recs.append(rec)
        has_ids.append(has_id)
        numbers.append(line0 + i + 1)
        ends.append(end if end < n_buf else n_buf)
        starts.append(start)
        index += 1
    _add_before(out, path, recs, has_ids, numbers, ends, starts)
    if record_crcs:
        view = memoryview(buf)
        out.crcs.extend([zlib.crc32(view[a:b]) for a, b in zip(starts, out.ends)])
    return out
