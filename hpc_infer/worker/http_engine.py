"""Batch through running OpenAI-compatible servers: the worker's engine when
`cluster.endpoint` is set, with the same interface as `vllm_engine.VllmEngine` (worker/protocol.py) (add, step,
unfinished, max_num_seqs), so planning, claims, trailers and the merge are unchanged.

Each record becomes one request (chat records to /v1/chat/completions, plain prompts to
/v1/completions) with the run's sampling, the record's own overrides and its per-record
seed; requests go round-robin over the ready replicas with bounded concurrency per
replica. All of them run on one asyncio loop in one thread (`openai.AsyncOpenAI`), so
128 requests in flight per replica over 100 replicas are 12,800 coroutines, not threads. The `openai` client (a vLLM dependency) retries connection errors and 5xx with
backoff; a replica that still fails is taken out of the rotation and its request goes
to the next one (a replica killed mid-run costs one retry cycle, not the run). When
every replica has failed, the worker fails with the error, releases its claims, and a
relaunch resumes. The key is read from the user's key file, never from worker.json.
Standard library + openai: importable in the cluster's vLLM image.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from .protocol import error_result, record_seed

# A request the server refuses on its own merits (too long, a value or schema it rejects, a
# model it does not serve) is that record's error; 401/403 (the key) and 429/5xx are not.
RECORD_ERRORS = (400, 404, 413, 422)

# SamplingParams fields the OpenAI request has at top level; the rest go in vLLM's extra_body.
TOP_LEVEL = {"n", "temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty"}


def url_problem(url: str) -> str | None:
    """Why `url` is not a base URL a worker may send the key to, or None: http(s), a host, an
    optional port and a plain path; no credentials, query, `..`, `//` or encoded dots."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return "not a valid URL"
    if u.scheme not in ("http", "https") or not u.hostname:
        return "give http(s)://host:port/v1"
    if u.username or u.password or "@" in u.netloc:
        return "credentials in a URL are not accepted; the key comes from the key file"
    if u.query or u.fragment or any(c.isspace() or ord(c) < 32 for c in url) or "\\" in url:
        return "no query, fragment, whitespace or backslash"
    if any(part in ("..", ".") for part in u.path.split("/")) or "%2e" in u.path.lower() or "//" in u.path:
        return "no '.', '..', '//' or encoded dots in the path"
    if port is not None and not 0 < port < 65536:
        return "a port between 1 and 65535"
    return None


WHO: dict[str, tuple] = {}  # a replica URL ready_urls found -> (its replica index, its job id): what it must prove


def ready_urls(endpoint: dict, key: str | None = None) -> tuple[list[str], bool]:
    """(the URLs to use now, whether that is the serve run's router), re-read at worker start
    so replicas restarted since the launch are found: the router when the launch found one
    and it proves it is this run's router now (serve/router_front.py), else the run's replicas that prove they hold its key (serve/auth.py: a state
    file left `ready` by a replica killed outright may name a port something else listens on
    now), else the URLs given (for a serve run, only those that prove it too)."""
    run = endpoint.get("run")
    if run and endpoint.get("router"):  # the serve run's router: one URL in front of its replicas
        try:
            state = json.loads((Path(run) / "serve" / "router.json").read_text())
        except (OSError, ValueError):
            state = {}
        if (
            isinstance(state, dict)
            and state.get("state") == "ready"
            and isinstance(state.get("url"), str)
            and url_problem(state["url"]) is None
            and _ours(state["url"], key, run, "router", state.get("job_id"))
        ):
            return [state["url"]], True
    urls = []
    if run:
        for path in sorted((Path(run) / "serve").glob("[0-9]*.json")):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if (
                isinstance(state, dict)
                and state.get("state") == "ready"
                and isinstance(state.get("url"), str)
                and url_problem(state["url"]) is None
                and _ours(state["url"], key, run, state.get("replica"), state.get("job_id"))
            ):
                urls.append(state["url"])
                WHO[state["url"]] = (state.get("replica"), state.get("job_id"))
    return urls or [u for u in endpoint.get("urls") or [] if not run], False


class HttpEngine:
    def __init__(self, endpoint: dict, model: dict):
        import httpx
        from openai import AsyncOpenAI

        key = Path(endpoint["key_file"]).expanduser().read_text().strip() if endpoint.get("key_file") else "EMPTY"
        self.key, self.run_dir = key, endpoint.get("run")
        self.urls, self.router = ready_urls(endpoint, key)
        if not self.urls:
            raise RuntimeError(
                f"no ready replica at {endpoint.get('run') or endpoint.get('urls')}; "
                f"start one with `hpc-infer serve`, or check `hpc-infer serve status`"
            )
        self.model = endpoint["model"]
        self.task = model.get("task", "auto")
        per = int(endpoint.get("concurrency", 128))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="hpc_infer-http").start()
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        self.clients = [
            AsyncOpenAI(
                base_url=u,
                api_key=key,
                max_retries=int(endpoint.get("max_retries", 6)),
                timeout=float(endpoint.get("timeout_s", 3600)),
                http_client=httpx.AsyncClient(limits=limits, follow_redirects=False),
            )
            for u in self.urls
        ]
        self.max_num_seqs = per * len(self.urls)
        self._pending: dict[Future, dict] = {}
        self._next = 0
        self.down: set[int] = set()  # replicas whose retries ran out: no new requests

    @property
    def unfinished(self) -> int:
        return len(self._pending)

    def add(self, records: list[dict], sampling: dict[str, Any] | None, seed: int | None) -> None:
        """`sampling=None` (OpenAI batch lines): only the body's fields are sent; the server
        applies its own defaults to the rest."""
        for r in records:
            kw = dict(sampling or {}, **(r.get("sampling") or {}))
            if sampling is not None and seed is not None and "seed" not in (r.get("sampling") or {}):
                kw["seed"] = record_seed(seed, r["id"])
            up = [i for i in range(len(self.clients)) if i not in self.down] or list(range(len(self.clients)))
            first = up[self._next % len(up)]
            self._next += 1
            future = asyncio.run_coroutine_threadsafe(self._failover(first, r, kw), self.loop)
            self._pending[future] = dict(r, seed=kw.get("seed"))

    async def _failover(self, first: int, record: dict, kw: dict) -> dict:
        """The request on replica `first`; when its retries run out on a connection error or
        a 5xx, or it answers a request cut short (finish_reason `abort`: a server stopping;
        our replicas turn that into a 503, serve/abort_guard.py, a server of someone else's
        may not), the same request on each other replica in turn (a replica that failed is
        not given new requests). Re-sending is safe: a request's output is kept only once."""
        from openai import APIConnectionError, APIStatusError, InternalServerError

        order = [first] + [i for i in range(len(self.clients)) if i != first]
        order = [i for i in order if i not in self.down] + [i for i in order if i in self.down]
        for n, i in enumerate(order):
            try:
                return await self._request(self.clients[i], record, kw)
            except APIStatusError as e:
                if e.status_code not in RECORD_ERRORS:
                    raise
                if (
                    e.status_code == 404
                    and self.run_dir
                    and not self.router
                    and not await asyncio.to_thread(
                        _ours, self.urls[i], self.key, self.run_dir, *WHO.get(self.urls[i], ("", ""))
                    )
                ):
                    self._mark_down(i, f"it no longer proves it is this serve run's ({e.status_code})", n, order)
                    continue  # not our server any more (a replica died, something else took its port): fail over
                err = error_result(record, _ServerRefused(e), e.status_code)
                return {k: err[k] for k in ("text", "outputs", "prompt_tokens", "output_tokens", "error")}
            except (APIConnectionError, InternalServerError, CutShort) as e:
                self._mark_down(i, f"failed after retries ({type(e).__name__}: {e})", n, order)
                if n + 1 == len(order):
                    raise
        raise RuntimeError(f"no replica of {self.run_dir or self.urls} is left that proves it is this run's")

    def _mark_down(self, i: int, why: str, n: int, order: list[int]) -> None:
        if i not in self.down:
            self.down.add(i)
            print(
                f"hpc_infer: replica {self.urls[i]} {why}; "
                f"{'sending its requests to the others' if n + 1 < len(order) else 'no replica left'}",
                file=sys.stderr,
                flush=True,
            )

    async def _request(self, client, record: dict, kw: dict) -> dict:
        top = {k: v for k, v in kw.items() if k in TOP_LEVEL}
        extra = {k: v for k, v in kw.items() if k not in TOP_LEVEL and k != "logprobs"}
        extra["return_token_ids"] = True  # exact per-output token counts, as the offline engine reports
        chat = self.task == "chat" or "messages" in record
        if kw.get("logprobs") is not None:
            top.update({"logprobs": True, "top_logprobs": kw["logprobs"]} if chat else {"logprobs": kw["logprobs"]})
        if chat:
            messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
            resp = await client.chat.completions.create(model=self.model, messages=messages, extra_body=extra, **top)
            texts = [c.message.content or "" for c in resp.choices]
        else:
            resp = await client.completions.create(model=self.model, prompt=record["prompt"], extra_body=extra, **top)
            texts = [c.text for c in resp.choices]
        outputs = []
        for c, text in zip(resp.choices, texts):
            ids = getattr(c, "token_ids", None) or (c.model_extra or {}).get("token_ids")
            outputs.append(
                {
                    "text": text,
                    "finish_reason": c.finish_reason,
                    "stop_reason": (c.model_extra or {}).get("stop_reason"),
                    "num_tokens": len(ids)
                    if ids is not None
                    else (resp.usage.completion_tokens if len(resp.choices) == 1 else None),
                }
            )
        if any(o["finish_reason"] == "abort" for o in outputs):  # never kept as the record's answer
            raise CutShort(
                f"answered with finish_reason 'abort' after {resp.usage.completion_tokens if resp.usage else '?'} tokens"
            )
        return {
            "text": outputs[0]["text"] if outputs else "",
            "outputs": outputs,
            "prompt_tokens": resp.usage.prompt_tokens if resp.usage else 0,
            "output_tokens": resp.usage.completion_tokens if resp.usage else 0,
        }

    def abort(self, chunk_id: int) -> int:
        """Cancel a chunk's requests not yet sent; ones in flight finish and are dropped."""
        futs = [f for f, r in self._pending.items() if r.get("chunk") == chunk_id]
        for f in futs:
            f.cancel()
            self._pending.pop(f, None)
        return len(futs)

    def step(self) -> list[dict]:
        """Wait for at least one request to finish; return the result records that did."""
        if not self._pending:
            return []
        done: set = set()
        while not done:  # in slices: the worker notices a signal between them
            done, _ = wait(list(self._pending), timeout=1.0, return_when=FIRST_COMPLETED)
        rows = []
        for fut in done:
            record = self._pending.pop(fut)
            rows.append(dict(record, **fut.result()))  # an exhausted retry raises here: the worker fails
        return rows


def _ours(url: str, key: str | None, run: str | None, replica: object, job: object) -> bool:
    from ..host.http import proves_ours

    return proves_ours(url.removesuffix("/v1"), key, run, replica, job) if run else True


class CutShort(Exception):
    """A 200 whose answer the server aborted (it was stopping): that replica's failure, not
    the record's output."""


class _ServerRefused(Exception):
    """A 4xx for one request, with the server's own error type, message and parameter."""

    def __init__(self, e: Any):
        body = e.body if isinstance(getattr(e, "body", None), dict) else {}
        body = body.get("error", body) if isinstance(body.get("error", body), dict) else body
        super().__init__(body.get("message") or getattr(e, "message", str(e)))
        self.parameter = body.get("param")
        self.kind = body.get("type") or type(e).__name__
