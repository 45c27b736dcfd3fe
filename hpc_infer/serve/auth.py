"""The key on every route of a served replica, except `/health`.

vLLM's own check (`VLLM_API_KEY`) guards only paths under /v1, /v2, /inference and
/cohere: `/invocations`, `/tokenize`, `/metrics`, `/openapi.json`, ... answered without a
key. This pure ASGI middleware, given to the server with `--middleware
hpc_infer.serve.auth.RequireKey`, turns away any request without the server's key
before it reaches a route, so a route a future vLLM adds is covered too. `/health`
stays open: the replica and the scheduler poll it, and it tells nothing.

`/hpc_infer/proof?nonce=N` is open too, and answers HMAC-SHA256(key, nonce + run
directory): a client that holds the key can tell our server from whatever else listens on
that port now (a replica killed outright leaves `ready` in its state file, and every vLLM
answers `/health`), without sending the key (`proves_ours`).

Stdlib only (it runs inside the server's process, in the cluster's vLLM image).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from urllib.parse import parse_qs

OPEN_PATHS = ("/health",)
PROOF_PATH = "/hpc_infer/proof"


def proof(key: str, nonce: str, run_dir: str) -> str:
    return hmac.new(key.encode(), f"hpc_infer-proof\n{nonce}\n{run_dir}".encode(), hashlib.sha256).hexdigest()


def proves_ours(base: str, key: str | None, run_dir: str | Path, timeout: float = 3.0) -> bool:
    """The server at `base` (http://host:port) holds this run's key and serves this run:
    it answers a fresh nonce with proof(). The key itself is never sent."""
    import secrets

    if not key or not base:
        return False
    nonce = secrets.token_hex(16)
    try:
        with _OPENER.open(f"{base}{PROOF_PATH}?nonce={nonce}", timeout=timeout) as r:
            answer = json.loads(r.read(4096)).get("proof", "")
    except Exception:  # nothing there, not ours, not JSON: not proven
        return False
    return isinstance(answer, str) and hmac.compare_digest(answer, proof(key, nonce, os.path.realpath(run_dir)))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: urllib would carry our Authorization header
    to wherever it points (another origin included)."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http(url: str, timeout: float = 5.0, key: str | None = None, method: str = "GET") -> tuple[int, str]:
    """(status, body) of one call with the run's key (0 when nothing answered); a redirect is
    returned as its status, never followed."""
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, HTTPException, ValueError):  # a server mid-start: reset, bad status line
        return 0, ""


class RequireKey:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        if not key:  # never serve open by accident: a server started without a key refuses all
            key = os.urandom(32).hex()
        self.digest = hashlib.sha256(key.encode()).digest()
        self._key, self._run_dir = key, os.path.realpath(os.environ.get("HPC_INFER_RUN_DIR") or "/nonexistent")

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    hashlib.sha256(token.strip().encode()).digest(), self.digest
                )
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path == PROOF_PATH and scope["type"] == "http":
            nonce = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("nonce") or [""])[0][:128]
            body = json.dumps({"proof": proof(self._key, nonce, self._run_dir)}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            return await send({"type": "http.response.body", "body": body})
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps(
            {
                "error": {
                    "message": "a valid API key is required (Authorization: Bearer KEY)",
                    "type": "Unauthorized",
                    "param": None,
                    "code": 401,
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
