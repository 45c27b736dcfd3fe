"""Records that cannot fit the model's context, found at plan time, with file:line.

A record cannot fit when its prompt's tokens (after the chat template) plus the tokens it
may generate exceed max_model_len: vLLM refuses a prompt longer than the context, and
vLLM's server refuses prompt + max_tokens over it (offline vLLM would silently stop at
the context's end). Planning stays near read speed: a token covers at least one byte, so
only the chunks whose longest prompt could exceed the limit (the chunk table's
`max_chars`, 4 bytes a character at most) are read again, and only their long records
are tokenized, with the tokenizer at the resolved model path.

`data.too_long` says what happens to them: `error` (default: refused before anything is
submitted, naming each line), `mark` (each becomes an error record; the run goes on),
`truncate` (plain prompts keep their last tokens, as vLLM's `truncate_prompt_tokens` did;
chat records cannot be cut safely and are marked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

MAX_BYTES_PER_CHAR = 4  # UTF-8
TEMPLATE_ROOM = 512  # chat template and special tokens, at most (checked exactly below)


def context_limit(rc: Any, model_path: str) -> int | None:
    if rc.model.max_model_len:
        return int(rc.model.max_model_len)
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)


def find_too_long(rc: Any, planned: Any, model_path: str, spec: Any) -> tuple[list[dict], str | None]:
    """([{index, line, tokens, limit, max_tokens}], a note when the check could not run)."""
    from ..worker.protocol import POOLING_TASKS
    from ..rundir import read_chunk_source

    limit = context_limit(rc, model_path)
    if not limit:
        return [], None
    pooling = rc.model.task in POOLING_TASKS
    batch = planned.input_format == "openai_batch"
    run_max = 0 if pooling else int(rc.sampling.max_tokens)
    floor = (limit - (0 if batch else run_max) - TEMPLATE_ROOM) // MAX_BYTES_PER_CHAR
    chunks = [c for c in planned.chunks if c.get("max_chars", 1 << 62) > floor]
    if not chunks:
        return [], None
    try:
        tok = _load_tokenizer(model_path)
    except Exception as e:  # not readable on the login node (only in the image, a gated copy, ...)
        return [], (
            f"prompt lengths not checked against max_model_len={limit} (the tokenizer at {model_path} could "
            f"not be loaded here: {type(e).__name__}); the workers will refuse what does not fit"
        )
    template = Path(rc.model.chat_template).read_text() if rc.model.chat_template else None
    found = []
    from ..rundir import RunDir

    staged = RunDir(Path(planned.staging)).fs
    for c in chunks:  # read back from the staged copy the way a worker reads its chunk
        parsed = read_chunk_source(staged, c, spec.to_json()).parsed
        for k, (rec, chars) in enumerate(zip(parsed.records, parsed.chars)):
            want = run_max
            if batch:
                o = rec.get("sampling") or {}
                want = int(o.get("max_tokens") or (0 if "messages" in rec else 16))
            if chars * MAX_BYTES_PER_CHAR + TEMPLATE_ROOM + want <= limit:
                continue
            if "messages" in rec:
                ids = tok.apply_chat_template(
                    rec["messages"], chat_template=template, tokenize=True, add_generation_prompt=True
                )
                n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding
            else:
                n = len(tok(rec["prompt"]).input_ids)
            if n + want > limit:
                found.append(
                    {
                        "index": rec["index"],
                        "line": parsed.record_lines[k],
                        "tokens": n,
                        "limit": limit,
                        "max_tokens": want,
                        "chat": "messages" in rec,
                    }
                )
    return found, None


def apply_policy(rc: Any, found: list[dict], where: str) -> dict:
    """`data.too_long=error` raises; otherwise the worker spec's `too_long` entry:
    {index: {"reason", "keep"}} (keep: prompt tokens to keep, for truncate)."""
    if not found:
        return {}
    policy = rc.data.too_long
    if policy == "error":
        shown = "\n  ".join(
            f"{where} line {f['line']}: prompt {f['tokens']} tokens + max_tokens {f['max_tokens']} > "
            f"max_model_len {f['limit']}"
            for f in found[:10]
        )
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise UserError(
            f"{len(found)} record{'s' * (len(found) != 1)} cannot fit the model's context:\n  {shown}{more}\n"
            f"Shorten them, raise model.max_model_len or lower sampling.max_tokens, or set "
            f"data.too_long=mark (each becomes an error record; the rest runs) or data.too_long=truncate "
            f"(plain prompts keep their last tokens)"
        )
    out = {}
    for f in found:
        reason = (
            f"This model's maximum context length is {f['limit']} tokens; the prompt has {f['tokens']} tokens "
            f"and max_tokens is {f['max_tokens']} (found at plan time)"
        )
        keep = f["limit"] - f["max_tokens"]
        if policy == "truncate" and not f["chat"] and keep > 0:
            out[str(f["index"])] = {"keep": keep, "reason": reason}
        else:
            out[str(f["index"])] = {
                "reason": reason + (" (chat records are not truncated)" if policy == "truncate" else "")
            }
    return out


def check_fit(rc: Any, planned: Any, model_path: str, say) -> dict:
    """What launch and sbatch both run after resolving the model: the worker spec's
    `too_long` (empty when everything fits), or UserError with data.too_long=error."""
    if rc.cluster.endpoint:
        return {}  # the server refuses what does not fit: that record's error
    found, note = find_too_long(rc, planned, model_path, planned.spec)
    if note:
        say(note)
    too_long = apply_policy(rc, found, str(rc.data.path))
    if too_long:
        kept = sum(1 for v in too_long.values() if "keep" in v)
        say(
            f"{len(too_long)} record{'s' * (len(too_long) != 1)} cannot fit max_model_len (data.too_long="
            f"{rc.data.too_long}): "
            + (f"{kept} truncated to their last tokens, " if kept else "")
            + f"{len(too_long) - kept} will be error records"
        )
    return too_long
