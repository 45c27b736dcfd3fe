"""The router's parts that need no served model (the served router is tested in
tests/test_serve.py on the local Slurm): its key check and the job it is submitted as."""

import dataclasses
import urllib.error
import urllib.request

import pytest

from conftest import compose
from hpc_infer.serve.fleet import router_cluster, router_wanted
from hpc_infer.serve.router import KeyCheck


def _answer(url: str, header: str | None) -> tuple[int, bytes]:
    """(status, body) of a GET with this Authorization header (none when None)."""
    req = urllib.request.Request(url, headers={"Authorization": header} if header else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _status(url: str, header: str | None) -> int:
    return _answer(url, header)[0]


def test_key_check_accepts_the_run_key_only():
    check = KeyCheck("s3cret-key")
    import threading

    threading.Thread(target=check.serve_forever, daemon=True).start()
    try:
        assert check.url.startswith("http://127.0.0.1:")
        assert _status(check.url, "Bearer s3cret-key") == 200
        assert _status(check.url, "bearer s3cret-key") == 200  # the scheme is case-insensitive (RFC 7235)
        for header in (None, "Bearer s3cret-ke", "Bearer s3cret-key2", "Basic s3cret-key", "s3cret-key", "Bearer "):
            assert _status(check.url, header) == 401, header
    finally:
        check.shutdown()


def test_router_job_is_the_replicas_cluster_without_gpus():
    rc = compose(
        "cluster=slurm_local",
        "cluster.gpus_per_task=2",
        "cluster.nodes_per_task=2",
        "cluster.qos=high",
        "serve.router_cpus=2",
        "serve.router_mem=3G",
    )
    spec = {
        "cluster_config": dataclasses.asdict(rc.cluster),
        "router_cpus": rc.serve.router_cpus,
        "router_mem": rc.serve.router_mem,
    }
    c = router_cluster(spec)
    assert (c.gpus_per_task, c.gres, c.nodes_per_task, c.cpus_per_task, c.mem) == (0, None, 1, 2, "3G")
    assert (c.partition, c.qos, c.time, c.backend) == (rc.cluster.partition, "high", rc.cluster.time, "slurm")


@pytest.mark.parametrize(
    "setting,replicas,expect", [(None, 1, False), (None, 2, True), (False, 4, False), (True, 1, True)]
)
def test_serve_router_on_by_default_above_one_replica(setting, replicas, expect):
    assert compose(f"serve.router={'null' if setting is None else str(setting).lower()}").serve.router is setting
    assert router_wanted({"router": setting}, replicas) is expect


# The router's public socket (serve/router_front.py): held by the router job, answering the
# proof itself, relaying the rest to vllm-router only while the child holds its port.


class _Inner:
    """A plain HTTP server standing for vllm-router: it records each request's path and
    Authorization header, and streams a body in pieces."""

    def __init__(self):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append((self.path, self.headers.get("Authorization")))
                pieces = [b"data: %d\n\n" % i for i in range(3)]
                self.send_response(200)
                self.send_header("content-length", str(sum(map(len, pieces))))
                self.end_headers()
                for p in pieces:
                    self.wfile.write(p)
                    self.wfile.flush()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _front(tmp_path, inner_port, inner_ok):
    import os

    from hpc_infer.host.http import proof
    from hpc_infer.serve.router_front import Front, bind_public

    run = os.path.realpath(tmp_path)
    sock = bind_public("127.0.0.1", 0)
    return Front(
        sock, lambda nonce, port: proof("the-key", nonce, run, port, "router", "77"), inner_port, inner_ok
    ).start()


def _get(url, key="the-key"):
    return _answer(url, f"Bearer {key}")


def test_router_front_proves_itself_and_relays_only_to_its_child(tmp_path):
    from hpc_infer.host.http import proves_ours

    inner = _Inner()
    ok = {"child": True}
    front = _front(tmp_path, inner.port, lambda: ok["child"])
    base = f"http://127.0.0.1:{front.port}"
    try:
        # the proof names this socket's port, "router" and the job: nothing else verifies
        assert proves_ours(base, "the-key", tmp_path, "router", "77")
        assert not proves_ours(base, "the-key", tmp_path, "router", "78")
        assert not proves_ours(base, "the-key", tmp_path, "0", "77")
        assert not proves_ours(base, "another-key", tmp_path, "router", "77")
        assert inner.seen == []  # proofs never reach vllm-router
        # everything else is relayed byte for byte, the body in its pieces
        code, body = _get(f"{base}/v1/models")
        assert code == 200 and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert inner.seen == [("/v1/models", "Bearer the-key")]
        # the child no longer holds its port (dead, or never seen listening): nothing is relayed
        ok["child"] = False
        code, body = _get(f"{base}/v1/models")
        assert code == 503 and len(inner.seen) == 1
    finally:
        front.stop()
        inner.server.shutdown()


def test_a_listener_relaying_the_challenge_to_the_router_is_refused(tmp_path):
    """Someone holding another port (a dead router's) passes challenges on to the live router
    and returns its answer: the answer names the live router's port, not the one asked."""
    from hpc_infer.host.http import proves_ours

    inner = _Inner()
    real = _front(tmp_path, inner.port, lambda: True)
    try:
        assert proves_ours(f"http://127.0.0.1:{real.port}", "the-key", tmp_path, "router", "77")
        # a plain TCP relay in front of it
        import socket
        import threading

        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4)
        port = lsock.getsockname()[1]

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                b.close()

        def serve():
            while True:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    return
                u = socket.create_connection(("127.0.0.1", real.port))
                threading.Thread(target=pipe, args=(c, u), daemon=True).start()
                threading.Thread(target=pipe, args=(u, c), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        assert not proves_ours(f"http://127.0.0.1:{port}", "the-key", tmp_path, "router", "77")
        lsock.close()
    finally:
        real.stop()
        inner.server.shutdown()


def test_listens_is_true_for_the_holder_of_the_port_only():
    import os
    import socket
    import subprocess
    import sys

    from hpc_infer.serve.router_front import listens

    mine = socket.socket()
    mine.bind(("127.0.0.1", 0))
    mine.listen(1)
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = int(other.stdout.readline())
        assert listens(os.getpid(), mine.getsockname()[1])
        assert not listens(os.getpid(), theirs)  # bound, listening, but not by us
        assert listens(other.pid, theirs)
    finally:
        other.kill()
        other.wait()
        mine.close()


def test_a_router_whose_port_is_taken_fails_naming_it_and_sends_no_key(tmp_path):
    """Someone listens on the router's port before it starts. Before the router held its own
    socket, it polled that port with the key until vllm-router answered, so the listener got
    the key (and, answering like a router, was published as the run's router)."""
    import http.server
    import json
    import os
    import subprocess
    import sys
    import threading

    seen = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = b'{"urls": []}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    theirs = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=theirs.serve_forever, daemon=True).start()
    key_file = tmp_path / "key"
    key_file.write_text("the-run-key\n")
    key_file.chmod(0o600)
    run = tmp_path / "serve-run"
    (run / "serve").mkdir(parents=True)
    spec = {"key_file": str(key_file), "host": "127.0.0.1", "router_port": theirs.server_address[1]}
    (run / "serve.json").write_text(json.dumps(spec))
    try:
        p = subprocess.run(
            [sys.executable, "-c", f"from hpc_infer.serve.router import run_router; run_router({str(run)!r})"],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, SLURM_JOB_ID="77"),
        )
    finally:
        theirs.shutdown()
    state = json.loads((run / "serve" / "router.json").read_text())
    assert p.returncode == 1, p.stderr[-2000:]
    assert state["state"] == "failed" and f"serve.router_port={theirs.server_address[1]}" in state["error"], state
    assert seen == []  # not one request, so no key


def test_the_front_answers_502_when_vllm_router_hangs_up_without_an_answer(tmp_path):
    """The relay is byte for byte, but a connection vllm-router closes before answering at all
    is a 502 to the client (which retries it), not a connection closed without a response."""
    import socket
    import threading

    inner = socket.socket()
    inner.bind(("127.0.0.1", 0))
    inner.listen(4)

    def hang_up():
        while True:
            try:
                c, _ = inner.accept()
            except OSError:
                return
            c.recv(65536)
            c.close()

    threading.Thread(target=hang_up, daemon=True).start()
    front = _front(tmp_path, inner.getsockname()[1], lambda: True)
    try:
        code, body = _get(f"http://127.0.0.1:{front.port}/v1/models")
        assert code == 502 and b"without an answer" in body, (code, body)
    finally:
        front.stop()
        inner.close()
