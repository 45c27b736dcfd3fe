"""The vLLM engine inside a worker: built once per task, fed chunk after chunk.

Chunks are enqueued into one running engine (`LLM.enqueue` / `LLM.enqueue_chat`, then
`llm_engine.step()`), so the batch never drains at a chunk boundary: the worker adds
the next chunk while the previous one is still generating.

Imports only the standard library and vLLM, because it runs inside the cluster's vLLM
image, not in the user's environment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def record_seed(run_seed: int, record_id: str) -> int:
    """A per-record seed, so a record's sample does not depend on chunking or worker."""
    digest = hashlib.sha256(f"{run_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


_SHARED: dict[str, "Engine"] = {}


class Engine:
    """One vLLM `LLM`; records in, finished result records out, in any order."""

    def __init__(self, model: dict[str, Any]):
        from vllm import LLM

        self.task = model.get("task", "auto")
        self.chat_template = model.get("chat_template")
        self.llm = LLM(model=model["path"], **(model.get("engine_kwargs") or {}))
        self._pending: dict[str, dict] = {}  # request id -> input record (+ seed)
        self._pending_alias: dict[str, str] = {}

    @classmethod
    def shared(cls, model: dict[str, Any]) -> "Engine":
        """One engine per model per process: the debug backend runs successive workers
        (relaunches, multirun) in one process, and loading the model is the slow part."""
        key = json.dumps(model, sort_keys=True)
        engine = _SHARED.get(key)
        if engine is None or engine.unfinished:  # a worker that failed may leave requests behind
            engine = _SHARED[key] = cls(model)
        return engine

    @property
    def max_num_seqs(self) -> int:
        """How many sequences the scheduler runs at once: refill below this."""
        try:
            return int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        except AttributeError:
            return 256

    @property
    def unfinished(self) -> int:
        return len(self._pending)

    def add(self, records: list[dict], sampling: dict[str, Any], seed: int | None) -> None:
        from vllm import SamplingParams

        params = []
        for r in records:
            kw = dict(sampling)
            if seed is not None:
                kw["seed"] = record_seed(seed, r["id"])
            params.append(SamplingParams(**kw))
        if self.task == "chat" or "messages" in records[0]:
            # A plain prompt sent to a chat task becomes one user turn.
            conversations = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in records]
            ids = self.llm.enqueue_chat(conversations, params, use_tqdm=False, chat_template=self.chat_template)
        else:
            ids = self.llm.enqueue([r["prompt"] for r in records], params, use_tqdm=False)
        for rid, record, p in zip(ids, records, params):
            self._pending[rid] = dict(record, seed=p.seed)
            # vLLM returns internal ids ("7-1a2b3c4d") but reports outputs under "7".
            self._pending_alias[_external_id(rid)] = rid

    def step(self) -> list[dict]:
        """Run one engine step; return the result records that finished in it."""
        engine = self.llm.llm_engine
        if self._pending and not engine.has_unfinished_requests():
            raise RuntimeError(f"vLLM finished with {len(self._pending)} of our requests unaccounted for")
        done = []
        for out in engine.step():
            if not out.finished:
                continue
            rid = out.request_id if out.request_id in self._pending else self._pending_alias.get(out.request_id)
            if rid in self._pending:
                self._pending_alias.pop(_external_id(rid), None)
                done.append(_result(self._pending.pop(rid), out))
        return done


def _external_id(request_id: str) -> str:
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else request_id


def _result(record: dict, out: Any) -> dict:
    completions = [
        {
            "text": c.text,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "num_tokens": len(c.token_ids),
        }
        for c in out.outputs
    ]
    res = dict(record)
    res["text"] = completions[0]["text"] if completions else ""
    res["outputs"] = completions
    res["prompt_tokens"] = len(out.prompt_token_ids or [])
    res["output_tokens"] = sum(c["num_tokens"] for c in completions)
    return res
