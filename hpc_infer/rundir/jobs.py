"""Which scheduler jobs belong to a run: one record file per submission, never rewritten.

Two launches of one run, two `serve scale`s at once, a launch and a `cancel`: each adds
its own file `jobs/<time>-<random>.json` (written whole by one rename), so no writer can
lose another's job ids, without a lock (`flock` is missing or per-client on the shared
file systems runs live on). Readers list the folder and order the records by time.
A record: {"backend", "time", "kind", "job_ids", "indices"?}; kinds:

- `workers`: batch workers of a launch;
- `replicas`: serve replicas, `indices[i]` the replica number of `job_ids[i]`;
- `router`: a serve run's router;
- `cancelled`: job ids `hpc-infer cancel` / `serve stop` ended on purpose (their
  workers' engine attempts are not engine deaths: rundir/isolate.py);
- `launch`: one launch's span, {started, ended} on the launcher's clock (the summary's
  wall time).

A run written by an older hpc_infer has one `jobs.json`; it is read as its records.
`where` is the run's pinned handle (`run.fs`: every record judged as it is opened, never by
a path resolved again), or a folder's path for a serve folder not yet on a handle.
Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .files import read_json, write_json
from .fsio import Dir

Where = Union[Dir, Path, str]

FOLDER = "jobs"
JOB_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.+]*")  # Slurm's 123, 123_4, 123+1; a local job's pid
LEGACY = "jobs.json"


@dataclass
class Record:
    backend: str
    kind: str
    job_ids: list[str]
    time: float = 0.0
    indices: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def add(root: Where, backend: str, kind: str, job_ids: list[str], indices: list[int] | None = None, **extra) -> None:
    """One more record; concurrent writers each get their own file."""
    now = time.time()
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
    record = {
        "backend": backend,
        "kind": kind,
        "time": now,
        "job_ids": list(job_ids),
        **({"indices": list(indices)} if indices is not None else {}),
        **extra,
    }
    if isinstance(root, Dir):
        root.mkdir(FOLDER)
        root.replace(f"{FOLDER}/{name}", json.dumps(record).encode())
        return
    folder = Path(root) / FOLDER
    folder.mkdir(exist_ok=True)
    write_json(folder / name, record)


def _names(root: Where) -> list[str]:
    if isinstance(root, Dir):
        return root.listdir(FOLDER)
    try:
        return os.listdir(Path(root) / FOLDER)
    except FileNotFoundError:
        return []


def _read(root: Where, name: str):
    if isinstance(root, Dir):
        return json.loads(root.read(name))
    return read_json(Path(root) / name)


def launches(root: Where) -> list[dict]:
    """Each launch's span on the launcher's own clock ({started, ended}, kind `launch`):
    one clock per launch, so a run's wall time never mixes the file server's and nodes'."""
    return [dict(r.extra) for r in records(root) if r.kind == "launch" and "started" in r.extra]


def _legacy(root: Where) -> list[Record]:
    try:
        old = _read(root, LEGACY)
    except (OSError, ValueError):
        return []
    out, index = [], 0
    for launch in old.get("launches", []):
        ids = [str(j) for j in launch.get("job_ids", [])]
        out.append(
            Record(
                old.get("backend", "debug"),
                "workers",
                ids,
                float(launch.get("time", 0)),
                list(range(index, index + len(ids))),
            )
        )
        index += len(ids)
    if old.get("router"):
        out.append(Record(old.get("backend", "debug"), "router", [str(old["router"])], float("inf")))
    return out


def records(root: Where) -> list[Record]:
    """Every record of the run, oldest first (a record being written is not there yet)."""
    out = _legacy(root)
    for name in sorted(_names(root)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            d = _read(root, f"{FOLDER}/{name}")
            if not all(isinstance(j, (str, int)) and JOB_ID.fullmatch(str(j)) for j in d["job_ids"]):
                continue  # not a job id any scheduler gives (an option such as --user=bob): data, refused
            known = ("backend", "kind", "job_ids", "time", "indices")
            out.append(
                Record(
                    str(d["backend"]),
                    str(d["kind"]),
                    [str(j) for j in d["job_ids"]],
                    float(d.get("time", 0)),
                    [int(i) for i in d.get("indices", [])],
                    {k: v for k, v in d.items() if k not in known},
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def backend_and_ids(root: Where, kinds: tuple[str, ...] = ("workers", "replicas")) -> tuple[str | None, list[str]]:
    """The backend of the run's latest submission and every job id of these kinds, in order."""
    recs = [r for r in records(root) if r.kind in kinds]
    if not recs:
        return None, []
    return recs[-1].backend, [j for r in recs for j in r.job_ids]


def replicas(root: Where) -> dict[int, str]:
    """A serve run's replica number -> its latest job id."""
    out: dict[int, str] = {}
    for r in records(root):
        if r.kind in ("replicas", "workers") and r.indices:
            out.update(zip(r.indices, r.job_ids))
    return out


def router(root: Where) -> str | None:
    recs = [r for r in records(root) if r.kind == "router"]
    return recs[-1].job_ids[-1] if recs else None


def cancelled(root: Where) -> set[str]:
    return {j for r in records(root) if r.kind == "cancelled" for j in r.job_ids}


def clear(root: Path) -> None:
    """A serve run served again under the same name starts a new list."""
    root = Path(root)
    (root / LEGACY).unlink(missing_ok=True)
    try:
        names = os.listdir(root / FOLDER)
    except FileNotFoundError:
        return
    for name in names:
        (root / FOLDER / name).unlink(missing_ok=True)


def claim_index(root: Path, folder: str, lo: int = 0) -> int:
    """The lowest free number >= lo, taken by creating `<folder>/<n>.slot` with O_EXCL: two
    `serve scale`s at once never pick the same replica number."""
    d = Path(root) / folder
    d.mkdir(exist_ok=True)
    n = lo
    while True:
        try:
            os.close(os.open(d / f"{n}.slot", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return n
        except FileExistsError:
            n += 1
