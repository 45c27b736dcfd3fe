"""A request the server cut short is not an answer: turn vLLM's 200 `abort` into a 503.

When a replica stops (scancel, the time limit, `serve stop`), Slurm signals every process
of the job at once. vLLM's engine core then aborts the requests it is running and the
ones that still arrive (vLLM's default `shutdown_timeout=0`), and the API server answers
each with **200** and `finish_reason: "abort"`, its text cut at whatever it had. No load
balancer retries a 200: through the router such a request reached the client truncated,
and our own batch worker would have kept it as the record's output.

This pure ASGI middleware (given to the server with `--middleware
hpc_infer.serve.abort_guard.AbortedIsUnavailable`) holds back a non-streaming completion
or chat completion that answered 200 with a choice whose finish reason is `abort`, and
sends 503 instead, the status vLLM itself uses for "retry on another instance": the
router re-sends it to another replica, the `openai` client retries it. A streamed answer
passes through untouched (its first tokens are already with the client; it ends with
`abort` for the client to see).

Stdlib only (it runs inside the server's process, in the cluster's vLLM image).
"""

from __future__ import annotations

import json

from .auth import route, send_json

GUARDED = ("/v1/completions", "/v1/chat/completions")

UNAVAILABLE = {
    "error": {
        "message": "the server stopped this request before it finished (finish_reason 'abort': the "
        "replica is shutting down or its engine stopped); send it again, to another replica",
        "type": "ServiceUnavailable",
        "param": None,
        "code": 503,
    }
}


def cut_short(body: bytes) -> bool:
    """Whether a completion's JSON body has a choice that vLLM aborted."""
    if b'"abort"' not in body:  # the common case, without parsing
        return False
    try:
        choices = json.loads(body).get("choices") or []
    except (ValueError, AttributeError):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices)


class AbortedIsUnavailable:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or route(scope) not in GUARDED:
            return await self.app(scope, receive, send)
        held: dict = {"start": None, "body": []}

        async def guarded_send(message):
            kind = message["type"]
            if kind == "http.response.start":
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                if message.get("status") == 200 and ctype.startswith(b"application/json"):
                    held["start"] = message  # a whole JSON answer: held until its last byte
                    return
                return await send(message)
            if kind != "http.response.body" or held["start"] is None:
                return await send(message)
            held["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(held["body"])
            if cut_short(body):
                return await send_json(send, 503, UNAVAILABLE, ((b"retry-after", b"1"),))
            await send(held["start"])
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, guarded_send)
