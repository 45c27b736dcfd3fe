"""A request a server cut short (vLLM's 200 with finish_reason `abort`, what a replica
being stopped answers) is never an answer: our replicas turn it into a 503 that the
router and the `openai` client retry (serve/abort_guard.py), and a batch worker sending
to a server without that guard re-sends it elsewhere instead of keeping it. The real
server's side is tested in test_serve.py (an engine stopped under running requests)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hpc_infer.serve.abort_guard import AbortedIsUnavailable


def _completion(finish: str, tokens: int = 2) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "text": " Paris" if finish != "abort" else "", "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens},
        }
    ).encode()


def _through_guard(
    body_parts: list[bytes], ctype=b"application/json", status=200, path="/v1/completions", method="POST"
):
    """What a client receives when an app answering `body_parts` sits behind the guard."""

    async def app(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"x-request-id", b"r1")],
            }
        )
        for i, part in enumerate(body_parts):
            await send({"type": "http.response.body", "body": part, "more_body": i + 1 < len(body_parts)})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    asyncio.run(AbortedIsUnavailable(app)(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    "parts", [[_completion("abort", 5)], [_completion("abort", 5)[:20], _completion("abort", 5)[20:]]]
)
def test_a_completion_cut_short_becomes_a_503_to_retry(parts):
    status, headers, body = _through_guard(parts)
    assert status == 503 and headers[b"retry-after"] == b"1"
    error = json.loads(body)["error"]
    assert error["code"] == 503 and "abort" in error["message"] and "another replica" in error["message"]
    assert int(headers[b"content-length"]) == len(body)


def test_a_chat_completion_with_one_choice_cut_short_becomes_a_503():
    chat = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": ""}, "finish_reason": "abort"},
        ],
    }
    assert _through_guard([json.dumps(chat).encode()], path="/v1/chat/completions")[0] == 503


@pytest.mark.parametrize(
    "parts, kw",
    [
        ([_completion("length")], {}),  # a whole answer
        ([_completion("stop")[:10], _completion("stop")[10:]], {}),  # in two pieces
        ([b'{"choices": [{"text": "the word \\"abort\\"", "finish_reason": "stop"}]}'], {}),  # "abort" in the text
        ([b'data: {"choices": [{"finish_reason": "abort"}]}\n\n'], {"ctype": b"text/event-stream"}),  # streamed
        ([_completion("abort")], {"path": "/v1/embeddings"}),  # not a completion route
        ([_completion("abort")], {"method": "GET"}),
        ([b'{"error": {"code": 400}}'], {"status": 400}),  # the server's own refusal
    ],
)
def test_what_is_not_cut_short_passes_through_untouched(parts, kw):
    status, headers, body = _through_guard(parts, **kw)
    assert status == kw.get("status", 200) and headers[b"x-request-id"] == b"r1"
    assert body == b"".join(parts)


class _Server(ThreadingHTTPServer):
    """A completions endpoint answering every request with `finish`, or with the guard's 503
    for finish="503" (counts what it got); GET (/health) answers 200."""

    daemon_threads = True

    def __init__(self, finish: str):
        self.finish, self.seen = finish, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.seen += 1
                if outer.finish == "503":
                    status, body = 503, _through_guard([_completion("abort")])[2]
                else:
                    status, body = 200, _completion(outer.finish)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _engine(urls: list[str]):
    from hpc_infer.worker.http_engine import HttpEngine

    return HttpEngine({"urls": urls, "model": "m", "max_retries": 0, "concurrency": 2}, {"task": "generate"})


def test_a_worker_resends_a_request_cut_short_to_another_replica(capsys):
    stopping, good = _Server("abort"), _Server("length")
    try:
        engine = _engine([stopping.url, good.url])
        engine.add([{"id": "a", "prompt": "The capital of France is", "chunk": 0}], {"max_tokens": 2}, None)
        rows = []
        while engine.unfinished:
            rows += engine.step()
        assert [(r["id"], r["text"], r["outputs"][0]["finish_reason"]) for r in rows] == [("a", " Paris", "length")]
        assert stopping.seen == 1 and good.seen == 1 and engine.down == {0}
        assert "finish_reason 'abort'" in capsys.readouterr().err  # said which replica and why
    finally:
        stopping.shutdown()
        good.shutdown()


def test_a_worker_with_only_servers_that_cut_short_fails_instead_of_keeping_it():
    from hpc_infer.worker.http_engine import CutShort

    stopping = _Server("abort")
    try:
        engine = _engine([stopping.url])
        engine.add([{"id": "a", "prompt": "x", "chunk": 0}], {"max_tokens": 2}, None)
        with pytest.raises(CutShort):
            while engine.unfinished:
                engine.step()
    finally:
        stopping.shutdown()


def test_the_router_resends_the_guards_503_to_another_replica(tmp_path):
    """Our router (vllm-router, started as serve/router.py starts it, behind its key check)
    in front of a replica answering the guard's 503 and a good one: every request reaches
    the client answered, including those first sent to the stopping replica."""
    import os
    import subprocess
    import sys
    import time

    from hpc_infer.host.http import http
    from hpc_infer.host.ports import free_port
    from hpc_infer.serve.router import KeyCheck, router_workers

    stopping, good = _Server("503"), _Server("length")
    check = KeyCheck("the-run-key")
    threading.Thread(target=check.serve_forever, daemon=True).start()
    port = free_port(20000, 60000)
    conf = {"policy": "round_robin", "host": "127.0.0.1", "port": port, "check_url": check.url}
    env = dict(os.environ, HPC_INFER_ROUTER_CONF=json.dumps(conf), HPC_INFER_ROUTER_KEY="the-run-key", NO_COLOR="1")
    with open(tmp_path / "router.log", "wb") as log:
        router = subprocess.Popen(
            [sys.executable, "-c", "from hpc_infer.serve.router import child_main; child_main()"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # a bound for a router that never starts only
        while router.poll() is None and time.time() < deadline and router_workers(base, "the-run-key") is None:
            time.sleep(0.2)
        for server in (stopping, good):
            code, text = http(
                f"{base}/add_worker?url={server.url.removesuffix('/v1')}", timeout=60, key="the-run-key", method="POST"
            )
            assert code == 200, (code, text)
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="the-run-key", max_retries=0)
        answers = [client.completions.create(model="m", prompt="x", max_tokens=2) for _ in range(6)]
        assert [a.choices[0].finish_reason for a in answers] == ["length"] * 6
        assert stopping.seen >= 1 and good.seen == 6  # what the stopping one got was re-sent to the good one
    finally:
        router.terminate()
        router.wait(timeout=60)
        check.shutdown()
        stopping.shutdown()
        good.shutdown()
