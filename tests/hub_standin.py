"""A local stand-in for huggingface.co's HTTP API, for the download and gated-model paths.

No model hub is reachable from these machines, so these tests point the real
huggingface_hub client (HF_ENDPOINT) at this server. It answers the requests
snapshot_download makes (repo info, file tree, HEAD/GET of files) and the hub's error
replies (403 + X-Error-Code: GatedRepo, 404 + RepoNotFound), and counts file downloads.

Dataset repos are served the way the Hub lays them out: /api/datasets/ORG/NAME/revision/REV,
/api/datasets/ORG/NAME/tree/REV?recursive=..., /datasets/ORG/NAME/resolve/REV/FILE, with
several revisions per repo (branches, tags, `refs/convert/parquet`), each its own commit, a
revision named by its name or its commit, and 404 RevisionNotFound for any other.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHA = "0123456789abcdef0123456789abcdef01234567"


def commit_of(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


class HubStandIn:
    def __init__(
        self,
        repos: dict[str, dict[str, bytes]],
        gated: set[str],
        datasets: dict[str, dict[str, dict[str, bytes]]] | None = None,
        gated_datasets: set[str] = frozenset(),
    ):
        """`datasets`: repo -> revision name ("main", "v1.0", "refs/convert/parquet") -> files."""
        self.repos, self.gated, self.downloads = repos, gated, []
        self.datasets, self.gated_datasets, self.requests = datasets or {}, set(gated_datasets), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def _dataset(self, path: str):
                from urllib.parse import unquote

                api = path.startswith("/api/datasets/")
                parts = path.removeprefix("/api/datasets/" if api else "/datasets/").split("/")
                repo, rest = "/".join(parts[:2]), parts[2:]
                if repo in hub.gated_datasets:
                    return self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
                if api and not rest:  # the repo's info at its default branch
                    rest = ["revision", "main"]
                if repo not in hub.datasets or len(rest) < 2:
                    return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                revs = hub.datasets[repo]
                asked = unquote(rest[1])
                name = next((r for r in revs if asked in (r, commit_of(repo, r))), None)
                if name is None:
                    return self._send(404, b'{"error": "Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
                files, sha = revs[name], commit_of(repo, name)
                if api and rest[0] == "revision":
                    info = {"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                    return self._send(200, json.dumps(info).encode())
                if api and rest[0] == "tree":
                    under = unquote("/".join(rest[2:]))
                    tree = [
                        {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in sorted(files.items())
                        if not under or f.startswith(under + "/")
                    ]
                    return self._send(200, json.dumps(tree).encode())
                if not api and rest[0] == "resolve":
                    fname = unquote("/".join(rest[2:]))
                    if fname in files:
                        if self.command == "GET":
                            hub.downloads.append(f"{repo}/{fname}")
                        data = files[fname]
                        return self._send(
                            200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                        )
                self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                if path.startswith(("/api/datasets/", "/datasets/")):
                    return self._dataset(path)
                repo = next((r for r in list(hub.repos) + list(hub.gated) if f"/{r}/" in path + "/"), None)
                if repo in hub.gated:
                    return self._send(403, b'{"error": "restricted"}', {"X-Error-Code": "GatedRepo"})
                if repo is None:
                    return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                files = hub.repos[repo]
                if path.startswith("/api/models/") and "/tree/" in path:
                    tree = [
                        {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in files.items()
                    ]
                    return self._send(200, json.dumps(tree).encode())
                if path.startswith("/api/models/"):
                    info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                    return self._send(200, json.dumps(info).encode())
                name = path.rsplit("/resolve/", 1)[-1].split("/", 1)[-1]
                if name in files:
                    if self.command == "GET":
                        hub.downloads.append(f"{repo}/{name}")
                    data = files[name]
                    return self._send(
                        200, data, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                    )
                self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
