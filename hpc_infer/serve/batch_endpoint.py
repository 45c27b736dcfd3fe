"""`cluster.endpoint`: where a batch run's workers send their requests, resolved and checked
on the login node before anything is planned.

A serve run directory is an input, not trusted config: its `serve.json` names the key
file whose contents the workers send as a bearer token, and its state files name the
URLs they send it to. So a serve directory is used only when it passes the trust rule
(rundir/trust.py, through ServeRun.open), the key file only when it is this user's, mode
0600 and in the user's key directory (or given explicitly with `serve.api_key_file`), a
replica only when it proves it holds the run's key (serve/auth.py), and a URL only when
it is a plain http(s)://host:port[/path] with no credentials and no `..` or other path
tricks.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..rundir import trust
from ..worker.http_engine import url_problem
from .fleet import router_url
from .serverun import ServeRun, check_key_file
from .status import replica_states


def check_url(url: str, where: str) -> str:
    """A base URL a worker may send the key to (worker/http_engine.py: url_problem), or UserError."""
    bad = url_problem(url)
    if bad:
        raise UserError(f"{where}: {url!r} refused ({bad})")
    return url


def resolve_endpoint(rc) -> dict:
    """cluster.endpoint: a `hpc-infer serve` run directory (its ready replicas, model name and
    key file), or base URL(s) with the key in serve.api_key_file. Checked before planning."""
    given = Path(rc.cluster.endpoint).expanduser()
    common = {"concurrency": rc.cluster.endpoint_concurrency}
    if (given / "serve.json").exists():
        where = f"cluster.endpoint={rc.cluster.endpoint}"
        run = ServeRun.open(given, where, trust.OWN)
        root, spec = run.root, run.spec
        explicit = bool(rc.serve.api_key_file)
        key_file = check_key_file(
            Path(rc.serve.api_key_file if explicit else spec["key_file"]),
            explicit or bool(spec.get("key_file_explicit")),
            "serve.api_key_file" if explicit else f"{where}: serve.json's key_file",
        )
        ready = [
            check_url(r["url"], f"{where}: replica {r['replica']}'s url")
            for r in replica_states(run)
            if r["state"] == "ready"
        ]
        if not ready:
            raise UserError(
                f"{where}: no replica is ready (`hpc-infer serve status {root}`); start or wait for one, then relaunch"
            )
        router = router_url(run, key_file.read_text().strip())
        if router:  # one URL; as many requests in flight as the replicas behind it take
            check_url(router, f"{where}: the router's url")
            return dict(
                common,
                run=str(root),
                urls=[router],
                router=True,
                model=spec["served_name"],
                key_file=str(key_file),
                model_path=spec["model"]["path"],
                concurrency=rc.cluster.endpoint_concurrency * len(ready),
            )
        return dict(
            common,
            run=str(root),
            urls=ready,
            model=spec["served_name"],
            key_file=str(key_file),
            model_path=spec["model"]["path"],
        )
    urls = [check_url(u.strip(), "cluster.endpoint") for u in rc.cluster.endpoint.split(",") if u.strip()]
    if not urls:
        raise UserError(
            f"cluster.endpoint={rc.cluster.endpoint}: give a `hpc-infer serve` run directory or "
            f"http(s)://host:port/v1 URL(s)"
        )
    if not rc.serve.api_key_file:
        raise UserError(
            "cluster.endpoint with URLs: name the file holding the server's API key with "
            "serve.api_key_file=... (a key never goes into the config)"
        )
    key_file = check_key_file(Path(rc.serve.api_key_file), True, "serve.api_key_file")
    return dict(
        common,
        run=None,
        urls=urls,
        model=rc.serve.name or rc.model.hf_id or rc.model.name,
        key_file=str(key_file),
        model_path=f"endpoint:{urls[0]}",
    )
