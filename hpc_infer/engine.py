"""The vLLM engine inside a worker: built once per task, run once per chunk.

Imports only the standard library and vLLM (and tqdm, which vLLM ships), because it
runs inside the cluster's vLLM image, not in the user's environment.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable


def record_seed(run_seed: int, record_id: str) -> int:
    """A per-record seed, so a record's sample does not depend on chunking or worker."""
    digest = hashlib.sha256(f"{run_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Engine:
    """One vLLM `LLM`, plus the mapping from input records to result records."""

    def __init__(self, model: dict[str, Any]):
        from vllm import LLM

        self.task = model.get("task", "auto")
        self.chat_template = model.get("chat_template")
        self.llm = LLM(model=model["path"], **(model.get("engine_kwargs") or {}))

    def run(
        self,
        records: list[dict],
        sampling: dict[str, Any],
        seed: int | None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[dict]:
        from vllm import SamplingParams

        params = []
        for r in records:
            kw = dict(sampling)
            if seed is not None:
                kw["seed"] = record_seed(seed, r["id"])
            params.append(SamplingParams(**kw))
        bar = _progress_bar(on_progress) if on_progress else False
        if self.task == "chat" or "messages" in records[0]:
            # A plain prompt sent to a chat task becomes one user turn.
            outs = self.llm.chat(
                [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in records],
                params,
                use_tqdm=bar,
                chat_template=self.chat_template,
            )
        else:
            outs = self.llm.generate([r["prompt"] for r in records], params, use_tqdm=bar)
        return [_result(r, o, p.seed) for r, o, p in zip(records, outs, params)]


def _result(record: dict, out: Any, seed: int | None) -> dict:
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
    res["seed"] = seed
    return res


def _progress_bar(on_progress: Callable[[int], None]):
    """A tqdm factory for vLLM's `use_tqdm` that reports finished requests to us."""
    from tqdm import tqdm

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["mininterval"] = 30.0
            super().__init__(*args, **kwargs)
            # vLLM also shows a bar while rendering prompts; count only generation.
            self._report = str(kwargs.get("desc", "")).startswith("Processed")

        def update(self, n=1):
            super().update(n)
            if self._report:
                on_progress(int(self.n))

    return _Bar
