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

Every file is read through the directory's pinned handle (rundir/fsio.py): opened once,
judged on its descriptor, each state file judged as it is opened (never re-resolved by
path, so a folder exchanged under a world-writable parent, a link or an ACL entry planted
after the check is refused, not read). Replicas and the router open their own directory
the same way, unjudged: the job runs as the user, on the directory the user's command made.
"""

from __future__ import annotations

import json
import os
import stat
import time
from functools import cached_property
from pathlib import Path

from ..errors import DamagedFile, UserError
from ..rundir import jobs, schema, trust
from ..rundir.fsio import Dir, PinnedDir

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
    def __init__(self, root: Path | str, level: str = trust.OWN, fs: Dir | None = None):
        self.root = Path(root)
        self.level = level  # trust.OWN: act on it; trust.SHARED: read it as data only
        self._fs = fs

    @property
    def fs(self) -> Dir:
        """The directory's pinned handle: the judged one of `open`, or (a replica's, the
        router's, a new run's) opened unjudged the first time it is needed."""
        if self._fs is None:
            self._fs = PinnedDir(self.root)
        return self._fs

    @classmethod
    def open(cls, path: Path | str, command: str, need: str = trust.OWN) -> "ServeRun":
        """The serve run a command was given, checked by the trust rule on its handle (and
        serve.json, the state folder and every state file as they are opened)."""
        root = Path(path).expanduser().resolve()
        fs = trust.open_dir(root, command, need)
        if fs.stat("serve.json") is None:
            fs.close()
            raise UserError(f"{path}: not a serve run directory (no serve.json)")
        level = trust.check_tree(root, command, need, SUBDIRS)
        run = cls(root, level, fs)
        raw = fs.read("serve.json")  # a link or another user's file in its place: refused, named
        try:
            run._spec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DamagedFile(f"{command}: {root / 'serve.json'} is not JSON; serve again into a new folder") from None
        for name in fs.listdir(STATE_DIR):
            if name.endswith(".json"):
                fs.read(f"{STATE_DIR}/{name}")  # each state file judged as it is opened
        if not isinstance(run._spec, dict):
            raise DamagedFile(f"{command}: {root / 'serve.json'} is not a JSON object; serve again into a new folder")
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
        return getattr(self, "_spec", None) or json.loads(self.fs.read("serve.json"))

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

    def _read_json(self, name: str):
        """A state file through the handle; a missing or damaged one reads as absent (one the
        rule refuses still stops the command: its UserError names the file)."""
        try:
            return json.loads(self.fs.read(name))
        except (OSError, ValueError):  # gone, half-written, or damaged (DamagedFile is a ValueError)
            return None

    def state(self, index: int) -> dict:
        """A replica's state file; one of the wrong shape (rundir/schema.py) reads as absent."""
        value = self._read_json(f"{STATE_DIR}/{index}.json")
        return value if not schema.problems(value, schema.REPLICA_STATE) else {}

    def router_state(self) -> dict | None:
        value = self._read_json(f"{STATE_DIR}/{ROUTER_STATE}")
        return value if not schema.problems(value, schema.ROUTER_STATE) else None

    def replica_jobs(self) -> dict[int, str]:
        """Replica number -> its (latest) job id."""
        return jobs.replicas(self.fs)

    def indices(self) -> list[int]:
        return sorted(self.replica_jobs())

    def router_job(self) -> str | None:
        return jobs.router(self.fs)

    def new_index(self) -> int:
        """A replica number no other submission has or will take (O_EXCL)."""
        return jobs.claim_index(self.root, STATE_DIR)

    def mark_stopped(self, index: int, why: str) -> None:
        """After its job ended: a replica killed before it could write why (SIGKILL after
        Slurm's KillWait) is marked stopped; one that wrote stopped or failed keeps its own word."""
        f = self.state(index) or {"replica": index}
        if f.get("state") not in ("stopped", "failed"):
            f.update(state="stopped", stopped_because=why, t=time.time())
            self.fs.replace(f"{STATE_DIR}/{index}.json", (json.dumps(f) + "\n").encode())

    def clear(self) -> None:
        """Before serving again under the same name: the last serve's states, slots and jobs go."""
        for name in self.fs.listdir(STATE_DIR):
            if name.endswith((".json", ".removing", ".slot")):
                self.fs.unlink(f"{STATE_DIR}/{name}")
        jobs.clear(self.root)
