"""Every path in a run directory, and the listings built from them. Standard library only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .chunks import chunk_done, read_chunk_source
from .files import current_umask, read_json

# the folders steps write into (each checked like the run directory itself: rundir/trust.py)
SUBDIRS = ("claims", "out", "heartbeats", "logs", "parts", "jobs", "attempts")


@dataclass(frozen=True)
class RunDir:
    root: Path

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
        return {cid for cid, name in _ids_in(self.out, ".jsonl") if chunk_done(self.out / name, cid)}

    def output_files(self) -> set[int]:
        """Chunk ids with an exactly named output file, checked or not (the merge checks them
        and names any damage)."""
        return {cid for cid, _ in _ids_in(self.out, ".jsonl")}

    def chunk_done(self, chunk_id: int) -> bool:
        return chunk_done(self.out_path(chunk_id), chunk_id)

    def claimed_chunks(self) -> set[int]:
        return {cid for cid, _ in _ids_in(self.claims, "")}


def _ids_in(folder: Path, suffix: str) -> list[tuple[int, str]]:
    """(id, name) for names that are exactly five digits plus `suffix`."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    n = 5 + len(suffix)
    return [(int(name[:5]), name) for name in names if len(name) == n and name[:5].isdigit() and name[5:] == suffix]


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
    for path in sorted(run.heartbeats.glob("*.json")):
        try:
            beats.append(read_json(path))
        except (OSError, ValueError):
            continue  # being replaced right now
    return beats


def read_chunk_records(run: RunDir, chunk_id: int) -> list[dict]:
    """Chunk `chunk_id`'s input records as a worker sees them (tools and tests)."""
    manifest = read_json(run.manifest)
    return read_chunk_source(run.input_copy, manifest["chunks"][chunk_id], read_json(run.worker_spec)["input"]).records
