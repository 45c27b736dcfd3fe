"""One object owns a serve run's files: `serve.json`, the job records, `serve/<i>.json`,
the router's state, the key.

Every door that reads a serve directory back (`serve status|metrics|scale|stop`, a re-serve,
`cluster.endpoint=`) opens it through `ServeRun.open`, which applies the trust rule
(rundir/trust.py): a serve directory someone else could have written is never used to
run its `python` string, send its key or signal its processes. The key is read only from
a 0600 file of the caller's in their key directory, or the file the caller named
(`serve.api_key_file`, recorded in their own serve.json). The jobs (replicas by number,
the router) are append-only records (rundir/jobs.py): two `serve scale`s at once lose
nothing, and replica numbers are taken with O_EXCL (`claim_index`).

Replicas and the router read their own serve.json inside the job without the check: the
job runs as the user, on the directory the user's own command made.
"""

from __future__ import annotations

import json
import os
import stat
import time
from functools import cached_property
from pathlib import Path

from ..errors import UserError
from ..rundir import jobs, trust, write_atomic

CONFIG_DIR = Path.home() / ".config" / "hpc_infer"
KEYS_DIR = CONFIG_DIR / "keys"
REGISTRY = CONFIG_DIR / "serve_runs"  # every serve run this user started, one path a line
STATE_DIR = "serve"
ROUTER_STATE = "router.json"
SUBDIRS = (STATE_DIR, "logs", jobs.FOLDER)


def check_key_file(path: Path | str, explicit: bool, where: str) -> Path:
    """The user's own key: a regular file, owned by the user, mode 0600, in the user's key
    directory unless named explicitly (serve.api_key_file)."""
    path = Path(path).expanduser()
    fd = trust.open_checked(path, where, trust.OWN)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.getuid():
        raise UserError(f"{where}: {path} is not yours (owner uid {st.st_uid}); a key file must be your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UserError(
            f"{where}: {path} is readable by others (mode {oct(stat.S_IMODE(st.st_mode))}); run `chmod 600 {path}`"
        )
    if not explicit:
        keys = KEYS_DIR.resolve()
        if path.resolve().parent != keys:
            raise UserError(
                f"{where}: the key file {path} is not in your key directory {keys}; a serve run "
                f"directory may only name keys there (give another one with serve.api_key_file=...)"
            )
    return path


class ServeRun:
    def __init__(self, root: Path | str, level: str = trust.OWN):
        self.root = Path(root)
        self.level = level  # trust.OWN: act on it; trust.SHARED: read it as data only

    @classmethod
    def open(cls, path: Path | str, command: str, need: str = trust.OWN) -> "ServeRun":
        """The serve run a command was given, checked by the trust rule (and serve.json with it)."""
        root = Path(path).expanduser().resolve()
        if not (root / "serve.json").exists():
            raise UserError(f"{path}: not a serve run directory (no serve.json)")
        level = trust.check_tree(root, command, need, SUBDIRS)
        run = cls(root, level)
        run._spec = trust.read_json(root / "serve.json", f"{command}: serve.json", need)
        for f in (root / STATE_DIR).glob("*.json"):
            trust.check(f, command, need)
        return run

    # --- paths ----------------------------------------------------------------------------
    @property
    def spec_path(self) -> Path:
        return self.root / "serve.json"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    def state_path(self, index: int) -> Path:
        return self.state_dir / f"{index}.json"

    def log_path(self, index: int) -> Path:
        return self.state_dir / f"{index}.log"

    def removing_marker(self, index: int) -> Path:
        """`serve scale` down writes this before cancelling a replica: the router stops sending to
        it first, so only requests already on it can be lost."""
        return self.state_dir / f"{index}.removing"

    @property
    def router_state_path(self) -> Path:
        return self.state_dir / ROUTER_STATE

    # --- contents -------------------------------------------------------------------------
    @cached_property
    def spec(self) -> dict:
        return getattr(self, "_spec", None) or json.loads(self.spec_path.read_text())

    def key(self) -> str | None:
        """The run's API key, only from a file that passes check_key_file, only for a run the
        caller owns (a shared run's key is never read, let alone sent)."""
        if self.level != trust.OWN or not self.spec.get("key_file"):
            return None
        try:
            path = check_key_file(
                self.spec["key_file"], bool(self.spec.get("key_file_explicit")), f"{self.spec_path}: key_file"
            )
            return path.read_text().strip()
        except (UserError, OSError):
            return None

    def state(self, index: int) -> dict:
        try:
            value = json.loads(self.state_path(index).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def router_state(self) -> dict | None:
        try:
            value = json.loads(self.router_state_path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def replica_jobs(self) -> dict[int, str]:
        """Replica number -> its (latest) job id."""
        return jobs.replicas(self.root)

    def indices(self) -> list[int]:
        return sorted(self.replica_jobs())

    def router_job(self) -> str | None:
        return jobs.router(self.root)

    def new_index(self) -> int:
        """A replica number no other submission has or will take (O_EXCL)."""
        return jobs.claim_index(self.root, STATE_DIR)

    def mark_stopped(self, index: int, why: str) -> None:
        """After its job ended: a replica killed before it could write why (SIGKILL after
        Slurm's KillWait) is marked stopped; one that wrote stopped or failed keeps its own word."""
        f = self.state(index) or {"replica": index}
        if f.get("state") not in ("stopped", "failed"):
            f.update(state="stopped", stopped_because=why, t=time.time())
            write_atomic(self.state_path(index), (json.dumps(f) + "\n").encode())

    def clear(self) -> None:
        """Before serving again under the same name: the last serve's states, slots and jobs go."""
        for pattern in ("*.json", "*.removing", "*.slot"):
            for old in self.state_dir.glob(pattern):
                old.unlink()
        jobs.clear(self.root)
