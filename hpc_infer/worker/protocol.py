"""The engine a worker drives, as a protocol: records in, finished result records out.

The worker (worker/worker.py) knows nothing of vLLM or HTTP: it claims chunks, puts their
records into an engine, steps it and publishes what finishes. Three engines implement it:
vLLM in the process (vllm_engine.py), running OpenAI-compatible servers (http_engine.py)
and a deterministic stand-in for tests and benches (fake_engine.py). Records the engine
refuses come back as error records (`error_result`), counted like results. Standard
library only.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

POOLING_TASKS = ("embed", "classify", "score")


class Engine(Protocol):
    max_num_seqs: int  # how many requests run at once: the worker refills below this
    generating_tokens: int  # tokens generated so far by requests still running (progress only)

    @property
    def unfinished(self) -> int:
        """Requests put in and not yet returned by step()."""

    def add(self, records: list[dict], sampling: dict[str, Any] | None, seed: int | None) -> None:
        """Put records in flight; a record the engine refuses comes back from step() as an error record."""

    def step(self) -> list[dict]:
        """Advance; the result records that finished (each the input record plus its outputs)."""

    def abort(self, chunk_id: int) -> int:
        """Drop a chunk's unfinished requests (another copy of it was published)."""

    # Optional (the ETA's end, worker/finish.py): each running request's tokens so far and
    # its max_tokens. An engine without it (HTTP) leaves the ETA to the record rate.
    # def running_tokens(self) -> list[tuple[int, int | None]]: ...


def record_seed(run_seed: int, record_id: str) -> int:
    """A per-record seed, so a record's sample does not depend on chunking or worker."""
    digest = hashlib.sha256(f"{run_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class TooLong(ValueError):
    """Prompt + max_tokens over max_model_len, found at plan time (data.too_long=mark)."""

    status = 400
    parameter = "input_tokens"


class ModelNotServed(LookupError):
    status = 404


def error_result(record: dict, exc: BaseException, status: int | None = None) -> dict:
    """The record, failed: its error in place of outputs. Counted once, like a result; the
    merge lists it in errors.jsonl. `code` is the HTTP status vLLM's server would give."""
    message = str(exc).strip() or type(exc).__name__
    res = dict(record)
    res.update(
        text=None,
        outputs=[],
        prompt_tokens=0,
        output_tokens=0,
        error={
            "type": getattr(exc, "kind", None) or type(exc).__name__,
            "message": message[:4000],
            "param": getattr(exc, "parameter", None),
            "code": status or getattr(exc, "status", None) or 400,
        },
    )
    return res
