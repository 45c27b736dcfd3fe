"""The router's public socket: it answers the run's proof itself and relays every other
connection to vllm-router on 127.0.0.1.

vllm-router (a Rust binary) cannot answer our proof, and a port it binds after we pick it
can be taken by anyone on the node in between. So the router job binds the public port
first and holds it for its whole life; a client that checks the proof at the router's URL
(serve/fleet.py, the worker's HTTP engine) is then talking to this job before it sends the
key, and the relay only connects to a child whose listening socket we have seen
(`listens`), never to whatever holds that port later.

The first request of a connection decides: `GET /hpc_infer/proof?nonce=...` is answered
here (the proof names our own socket's port, "router" and the job id) and the connection
closed; anything else is relayed byte for byte, both ways, until either side closes. One
head is read (up to 64 KiB), nothing is parsed after it, so streaming answers pass
unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from ..host.http import PROOF_PATH

HEAD_LIMIT = 64 * 1024


def listens(pid: int, port: int) -> bool:
    """Process `pid` itself holds a listening TCP socket on `port` (then nobody else can bind
    it while that process lives: SO_REUSEPORT is refused across users)."""
    import psutil  # a dependency of vLLM; only the router job needs it

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def bind_public(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), held by this process from now on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our own TIME_WAIT, not a sharer
        s.bind((host, port))
        s.listen(1024)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


class Front:
    """Serves `sock` in a thread of its own: proofs from `answer(nonce, port)`, everything
    else relayed to 127.0.0.1:`inner_port` while `inner_ok()` holds (else 503)."""

    def __init__(
        self, sock: socket.socket, answer: Callable[[str, int], str], inner_port: int, inner_ok: Callable[[], bool]
    ):
        self.sock, self.answer, self.inner_port, self.inner_ok = sock, answer, inner_port, inner_ok
        self.port = sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="router-front")

    def start(self) -> "Front":
        ready = threading.Event()
        self._ready = ready
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.sock.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, sock=self.sock, limit=HEAD_LIMIT)
        )
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) == 3 and parts[0] == b"GET" and urlsplit(parts[1].decode("latin-1")).path == PROOF_PATH:
            nonce = (parse_qs(urlsplit(parts[1].decode("latin-1")).query).get("nonce") or [""])[0][:128]
            await _reply(writer, 200, json.dumps({"proof": self.answer(nonce, self.port)}).encode())
            return
        if not self.inner_ok():
            await _reply(writer, 503, b'{"error": "the router is not ready"}')
            return
        try:
            inner_r, inner_w = await asyncio.open_connection("127.0.0.1", self.inner_port)
        except OSError:
            await _reply(writer, 503, b'{"error": "the router is not answering"}')
            return
        inner_w.write(head)
        forward = asyncio.ensure_future(_pipe(reader, inner_w))
        try:
            # the connection lasts as long as vllm-router's side of it: once that ends, nothing
            # the client sends can be answered
            if not await _pipe(inner_r, writer):  # it ended before answering at all: say so
                await _reply(writer, 502, b'{"error": "the router closed the connection without an answer"}')
        finally:
            forward.cancel()
            inner_w.close()
            writer.close()


async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    reason = {200: "OK", 502: "Bad Gateway", 503: "Service Unavailable"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n".encode()
        + body
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> int:
    """Copy until `src` ends, then end `dst` (half-close, so the other way still finishes);
    the bytes copied. An error on either side ends the copy; a caller that copied nothing
    back may still answer (the writer is left open then)."""
    n = 0
    try:
        while data := await src.read(65536):
            dst.write(data)
            n += len(data)
            await dst.drain()
        if n and dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        if n:
            dst.close()
    return n
