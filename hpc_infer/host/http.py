"""Calls to the run's own servers (stdlib): the key sent only as a header and never after a
redirect, and the proof that a server holds the run's key without sending it (the server
side is serve/auth.py's middleware). Used by the router, `serve status`, the replica and
the worker's HTTP engine."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

PROOF_PATH = "/hpc_infer/proof"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_matches(authorization: str, digest: bytes) -> bool:
    """An `Authorization` header value carries the key whose key_digest() is `digest`; the
    digests are compared in constant time (never the key itself, whose length would show)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), digest)


def proof(key: str, nonce: str, run_dir: str, port: int | str, replica: str, job: str) -> str:
    """HMAC of the run's key over the nonce and everything that names one server: the run, the
    port its own socket is bound to (not a header), its replica index and its job id. A
    challenge relayed to a sibling replica comes back with the sibling's port and index in
    it, and does not verify."""
    text = f"hpc_infer-proof-2\n{nonce}\n{run_dir}\n{port}\n{replica}\n{job}"
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


def proves_ours(
    base: str, key: str | None, run_dir: str | Path, replica: object, job: object, timeout: float = 3.0
) -> bool:
    """The server at `base` (http://host:port) is replica `replica` of job `job` of this run,
    listening on that port itself: it answers a fresh nonce with proof(). The key is never
    sent, and anything but a well-formed proof (not JSON, another type, non-ASCII, too long)
    is a refusal, never an error."""
    import secrets
    from urllib.parse import urlsplit

    if not key or not base:
        return False
    try:
        port = urlsplit(base).port
    except ValueError:
        return False
    if not port:
        return False
    nonce = secrets.token_hex(16)
    try:
        with _OPENER.open(f"{base}{PROOF_PATH}?nonce={nonce}", timeout=timeout) as r:
            answer = json.loads(r.read(4096))
        answer = answer.get("proof") if isinstance(answer, dict) else None
    except Exception:  # nothing there, not ours, not JSON: not proven
        return False
    if not isinstance(answer, str) or len(answer) != 64 or not answer.isascii():
        return False
    want = proof(key, nonce, os.path.realpath(run_dir), port, str(replica), str(job))
    return hmac.compare_digest(answer, want)


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
