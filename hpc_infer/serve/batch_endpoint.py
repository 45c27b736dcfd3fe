"""`cluster.endpoint`: where a batch run's workers send their requests, resolved and checked
on the login node before anything is planned.

A serve run directory is an input, not trusted config: its `serve.json` names the key
file whose contents the workers send as a bearer token, and its state files name the
URLs they send it to. So, like ssh's StrictModes, a serve directory (and the files in
it) is used only when it is owned by this user and writable by nobody else, the key
file only when it is this user's, mode 0600 and in the user's key directory (or given
explicitly with `serve.api_key_file`), and a URL only when it is a plain
http(s)://host:port[/path] with no credentials and no `..` or other path tricks.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import UserError
from ..worker.http_engine import url_problem
from .fleet import router_url
from .status import KEYS_DIR, replica_states


def check_url(url: str, where: str) -> str:
    """A base URL a worker may send the key to (worker/http_engine.py: url_problem), or UserError."""
    bad = url_problem(url)
    if bad:
        raise UserError(f"{where}: {url!r} refused ({bad})")
    return url


def _owned_private(path: Path, what: str, dir_ok: bool = False) -> None:
    """Owned by this user and not writable by group or others (ssh's StrictModes)."""
    try:
        st = path.lstat()
    except OSError as e:
        raise UserError(f"{what}: cannot read {path} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{what}: {path} is a symbolic link; a serve run's files must be the files themselves")
    if st.st_uid != os.getuid():
        raise UserError(f"{what}: {path} is not yours (owner uid {st.st_uid}); use a serve run you started")
    if st.st_mode & 0o022:
        raise UserError(f"{what}: {path} is writable by others (mode {oct(stat.S_IMODE(st.st_mode))}); anyone could "
                        f"point your workers elsewhere. Run `chmod go-w {path}`")
    if stat.S_ISDIR(st.st_mode) and not dir_ok:
        raise UserError(f"{what}: {path} is a directory")


def check_key_file(path: Path, explicit: bool, where: str) -> Path:
    """The user's own key: a regular file, owned by the user, mode 0600, in the user's key
    directory unless named explicitly (serve.api_key_file)."""
    path = Path(path).expanduser()
    _owned_private(path, where)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{where}: {path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UserError(f"{where}: {path} is readable by others (mode {oct(stat.S_IMODE(st.st_mode))}); "
                        f"run `chmod 600 {path}`")
    if not explicit:
        keys = KEYS_DIR.resolve()
        if path.resolve().parent != keys:
            raise UserError(f"{where}: the key file {path} is not in your key directory {keys}; a serve run "
                            f"directory may only name keys there (give another one with serve.api_key_file=...)")
    return path


def resolve_endpoint(rc) -> dict:
    """cluster.endpoint: a `hpc-infer serve` run directory (its ready replicas, model name and
    key file), or base URL(s) with the key in serve.api_key_file. Checked before planning."""
    given = Path(rc.cluster.endpoint).expanduser()
    common = {"concurrency": rc.cluster.endpoint_concurrency}
    if (given / "serve.json").exists():
        root = given.resolve()
        where = f"cluster.endpoint={rc.cluster.endpoint}"
        _owned_private(root, where, dir_ok=True)
        _owned_private(root / "serve.json", where)
        if (root / "serve").exists():
            _owned_private(root / "serve", where, dir_ok=True)
            for f in (root / "serve").glob("*.json"):
                _owned_private(f, where)
        spec = json.loads((root / "serve.json").read_text())
        explicit = bool(rc.serve.api_key_file)
        key_file = check_key_file(Path(rc.serve.api_key_file if explicit else spec["key_file"]), explicit,
                                  "serve.api_key_file" if explicit else f"{where}: serve.json's key_file")
        ready = [check_url(r["url"], f"{where}: replica {r['replica']}'s url") for r in replica_states(root)
                 if r["state"] == "ready"]
        if not ready:
            raise UserError(f"{where}: no replica is ready (`hpc-infer serve status {root}`); start or wait for one, "
                            f"then relaunch")
        router = router_url(root, key_file.read_text().strip())
        if router:  # one URL; as many requests in flight as the replicas behind it take
            check_url(router, f"{where}: the router's url")
            return dict(common, run=str(root), urls=[router], router=True, model=spec["served_name"],
                        key_file=str(key_file), model_path=spec["model"]["path"],
                        concurrency=rc.cluster.endpoint_concurrency * len(ready))
        return dict(common, run=str(root), urls=ready, model=spec["served_name"], key_file=str(key_file),
                    model_path=spec["model"]["path"])
    urls = [check_url(u.strip(), "cluster.endpoint") for u in rc.cluster.endpoint.split(",") if u.strip()]
    if not urls:
        raise UserError(f"cluster.endpoint={rc.cluster.endpoint}: give a `hpc-infer serve` run directory or "
                        f"http(s)://host:port/v1 URL(s)")
    if not rc.serve.api_key_file:
        raise UserError("cluster.endpoint with URLs: name the file holding the server's API key with "
                        "serve.api_key_file=... (a key never goes into the config)")
    key_file = check_key_file(Path(rc.serve.api_key_file), True, "serve.api_key_file")
    return dict(common, run=None, urls=urls, model=rc.serve.name or rc.model.hf_id or rc.model.name,
                key_file=str(key_file), model_path=f"endpoint:{urls[0]}")

