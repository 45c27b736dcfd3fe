"""Every path in a run directory, and the listings built from them. Standard library only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DamagedFile
from .chunks import chunk_done, read_chunk_source
from .files import current_umask
from . import schema
from .fsio import Dir

# the folders steps write into (each checked like the run directory itself: rundir/trust.py)
SUBDIRS = ("claims", "out", "heartbeats", "logs", "parts", "jobs", "attempts")


@dataclass(frozen=True)
class RunDir:
    """A run directory: its paths (for messages, logs and the steps not yet on the handle)
    and `fs`, the pinned handle every protocol step reads and writes through (opened and
    judged on first use: rundir/trust.py `open_dir`; the simulator passes its own)."""

    root: Path
    given_fs: Any = field(default=None, compare=False, repr=False)

    @property
    def fs(self) -> Dir:
        if self.given_fs is None:
            from .trust import SHARED, open_dir

            object.__setattr__(self, "given_fs", open_dir(self.root, "run directory", need=SHARED))
        return self.given_fs

    def read_json(self, name: str) -> Any:
        """A JSON file of the run, read through its handle; one that does not parse is named."""
        raw = self.fs.read(name)
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise DamagedFile(
                f"{self.fs.where(name)}: not the JSON hpc_infer wrote there ({e}); the run directory was "
                f"damaged or edited. Plan it again under a new run_name=..."
            ) from None
        shape = schema.BY_NAME.get(name)
        wrong = (schema.problems(value, shape) or schema.semantic(name, value)) if shape else []
        if wrong:
            raise DamagedFile(
                f"{self.fs.where(name)}: not what hpc_infer wrote there ({'; '.join(wrong[:3])}"
                f"{f'; {len(wrong) - 3} more' if len(wrong) > 3 else ''}); the run directory was damaged or "
                f"edited. Plan it again under a new run_name=..."
            )
        return value

    @staticmethod
    def claim_name(chunk_id: int) -> str:
        return f"claims/{chunk_id:05d}"

    @staticmethod
    def out_name(chunk_id: int) -> str:
        return f"out/{chunk_id:05d}.jsonl"

    @staticmethod
    def heartbeat_name(worker_id: str) -> str:
        return f"heartbeats/{worker_id}.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def worker_spec(self) -> Path:
        return self.root / "worker.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def input_copy(self) -> Path:
        """The input's bytes as planned (rows as JSON for csv/parquet); chunk i is the byte
        range manifest["chunks"][i]["offset"] .. + ["bytes"]."""
        return self.root / "input.copy"

    @property
    def claims(self) -> Path:
        return self.root / "claims"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def results(self, fmt: str = "jsonl", partial: bool = False) -> Path:
        """Each format its own file: merges in two formats never replace each other's result."""
        name = "results.partial" if partial else "results"
        return self.root / (f"{name}.openai_batch.jsonl" if fmt == "openai_batch" else f"{name}.{fmt}")

    def claim_path(self, chunk_id: int) -> Path:
        return self.claims / f"{chunk_id:05d}"

    def out_path(self, chunk_id: int) -> Path:
        return self.out / f"{chunk_id:05d}.jsonl"

    def heartbeat_path(self, worker_id: str) -> Path:
        return self.heartbeats / f"{worker_id}.json"

    def make(self) -> None:
        for d in (self.claims, self.out, self.heartbeats, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def done_chunks(self) -> set[int]:
        """Chunk ids with a finished output: exactly `NNNNN.jsonl` (a stray `.bak` copy,
        a temp file or `00001 (copy).jsonl` never counts) whose trailer names that chunk
        and whose size matches the trailer's byte count."""
        return {cid for cid, name in _ids_in(self.fs, "out", ".jsonl") if chunk_done(self.fs, f"out/{name}", cid)}

    def output_files(self) -> set[int]:
        """Chunk ids with an exactly named output file, checked or not (the merge checks them
        and names any damage)."""
        return {cid for cid, _ in _ids_in(self.fs, "out", ".jsonl")}

    def chunk_done(self, chunk_id: int) -> bool:
        return chunk_done(self.fs, self.out_name(chunk_id), chunk_id)

    def claimed_chunks(self) -> set[int]:
        return {cid for cid, _ in _ids_in(self.fs, "claims", "")}


def chunk_id_of(stem: str) -> int | None:
    """The chunk id a name's stem spells exactly as we write it (`{id:05d}`: five digits,
    more from chunk 100,000 on, no extra leading zero; ASCII digits only, since `int()`
    also reads other scripts' digits and refuses some that `isdigit()` accepts), else None."""
    if len(stem) < 5 or not (stem.isascii() and stem.isdigit()):
        return None
    cid = int(stem)
    return cid if f"{cid:05d}" == stem else None


def _ids_in(fs: Dir, folder: str, suffix: str) -> list[tuple[int, str]]:
    """(id, name) for names that are a chunk id as we write it plus `suffix`."""
    out = []
    for name in fs.listdir(folder):
        if name.endswith(suffix):
            cid = chunk_id_of(name.removesuffix(suffix))
            if cid is not None:
                out.append((cid, name))
    return out


def secure_root(root: Path, kind: str, group: str | None = None) -> None:
    """The staged run tree before it is published: folders 0700 (private) or 2750 (group:
    setgid, so what workers write later gets the group too), else the umask's; with a group,
    every folder and file in it (manifest, config, worker.json, input.copy, ...) gets it, so
    a member can run `status` and `merge --out` on the run."""
    import grp

    gid = grp.getgrnam(group).gr_gid if group else -1
    mode = (0o777 & ~current_umask()) | (0o2000 if kind == "group" else 0)
    for d, dirs, files in os.walk(root):
        if gid >= 0:
            os.chown(d, -1, gid)
            for f in files:
                os.chown(os.path.join(d, f), -1, gid, follow_symlinks=False)
        os.chmod(d, mode)


def read_heartbeats(run: RunDir) -> list[dict]:
    """Every worker's latest heartbeat (heartbeats/W.json), skipping one being replaced."""
    beats = []
    for name in sorted(n for n in run.fs.listdir("heartbeats") if n.endswith(".json") and not n.startswith(".")):
        try:
            beats.append(run.read_json(f"heartbeats/{name}"))
        except (OSError, ValueError):
            continue  # being replaced right now
    return beats


def read_chunk_records(run: RunDir, chunk_id: int) -> list[dict]:
    """Chunk `chunk_id`'s input records as a worker sees them (tools and tests)."""
    manifest = run.read_json("manifest.json")
    return read_chunk_source(run.fs, manifest["chunks"][chunk_id], run.read_json("worker.json")["input"]).records
