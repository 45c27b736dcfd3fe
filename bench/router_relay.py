"""The router's front alone (serve/router_front.py): requests through its relay vs. straight to
the server behind it, side by side in one process.

A plain HTTP/1.1 server stands for vllm-router (a 2,000-byte answer to each POST); clients
keep their connections open, as the `openai` client does, with `--concurrency` in flight.
Prints requests a second both ways for each round and their ratio. What the relay costs on
top of vllm-router; bench/serve_router.py measures the whole served path.

    .venv/bin/python bench/router_relay.py [--requests 2000] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import http.server
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_infer.serve.router_front import Front, bind_public  # noqa: E402


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"x" * 2000
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # like vllm-router's; http.server's 5 drops connects under a burst
    daemon_threads = True


def rate(port: int, requests: int, concurrency: int) -> float:
    """Requests a second, `concurrency` kept-open connections sending in turn."""

    def client(_):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(requests // concurrency):
            c.request("POST", "/v1/completions", body=b"{}" * 100, headers={"content-type": "application/json"})
            c.getresponse().read()
        c.close()

    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return requests / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = Server(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    front = Front(bind_public("127.0.0.1", 0), lambda nonce, port: "", server.server_address[1], lambda: True).start()
    try:
        for k in range(args.rounds):
            direct = rate(server.server_address[1], args.requests, args.concurrency)
            relayed = rate(front.port, args.requests, args.concurrency)
            print(
                f"round {k + 1}: direct {direct:.0f} req/s, through the front {relayed:.0f} req/s: "
                f"{relayed / direct:.3f}",
                flush=True,
            )
    finally:
        front.stop()
        server.shutdown()


if __name__ == "__main__":
    main()
