"""The key on every route of a served replica, except `/health`.

vLLM's own check (`VLLM_API_KEY`) guards only paths under /v1, /v2, /inference and
/cohere: `/invocations`, `/tokenize`, `/metrics`, `/openapi.json`, ... answered without a
key. This pure ASGI middleware, given to the server with `--middleware
hpc_infer.serve.auth.RequireKey`, turns away any request without the server's key
before it reaches a route, so a route a future vLLM adds is covered too. `/health`
stays open: the replica and the scheduler poll it, and it tells nothing.

`/hpc_infer/proof?nonce=N` is open too, and answers HMAC-SHA256(key, nonce, run directory,
the port of the server's own socket, its replica index, its job id): a client that holds
the key can tell this replica's server from whatever else listens on that port now (a
replica killed outright leaves `ready` in its state file, every vLLM answers `/health`, and
a listener relaying the challenge to a sibling replica gets the sibling's port and index
proven, which does not verify), without sending the key (host/http.py: `proves_ours`).

Stdlib only (it runs inside the server's process, in the cluster's vLLM image).
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs

from ..host.http import PROOF_PATH, bearer_matches, key_digest, proof

OPEN_PATHS = ("/health",)


def route(scope) -> str:
    """The request's path below the app's `root_path`: what a route matches."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def send_json(send, status: int, payload: dict, headers: tuple = ()) -> None:
    """A whole JSON answer from an ASGI middleware (ours answer before or instead of vLLM)."""
    body = json.dumps(payload).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        if not key:  # never serve open by accident: a server started without a key refuses all
            key = os.urandom(32).hex()
        self.digest = key_digest(key)
        self._key, self._run_dir = key, os.path.realpath(os.environ.get("HPC_INFER_RUN_DIR") or "/nonexistent")
        # what names this server in its proof (set by serve/replica.py for its own child only)
        self._replica = os.environ.get("HPC_INFER_REPLICA", "")
        self._job = os.environ.get("HPC_INFER_JOB_ID", "")

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                return bearer_matches(value.decode("latin-1"), self.digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        path = route(scope)
        if path == PROOF_PATH and scope["type"] == "http":
            nonce = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("nonce") or [""])[0][:128]
            port = (scope.get("server") or ("", ""))[1]  # the port of our own socket, as the server sees it
            answer = proof(self._key, nonce, self._run_dir, port, self._replica, self._job)
            return await send_json(send, 200, {"proof": answer})
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        error = {
            "message": "a valid API key is required (Authorization: Bearer KEY)",
            "type": "Unauthorized",
            "param": None,
            "code": 401,
        }
        await send_json(send, 401, {"error": error}, ((b"www-authenticate", b"Bearer"),))
