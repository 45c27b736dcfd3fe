"""The run directory's one write primitive (temp file + fsync + rename) and its readers,
with the umask every run file is created under (the run's `permissions`). Standard
library only: workers import it inside the cluster's vLLM image."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from . import faults

_UMASK = os.umask(0)
os.umask(_UMASK)


# permissions setting -> umask for everything a run writes (claims, logs, scripts included)
UMASKS = {"private": 0o077, "group": 0o027}


def current_umask() -> int:
    return _UMASK


def set_permissions(kind: str | None) -> None:
    """Apply the run's permissions to this process (launcher or worker) and its children."""
    global _UMASK
    if kind in UMASKS:
        os.umask(UMASKS[kind])
        _UMASK = UMASKS[kind]


@contextmanager
def atomic_file(path: Path, written: str = "tmp_written", renamed: str = "renamed") -> Iterator[BinaryIO]:
    """A file that readers see whole or not at all: written under a temp name in its folder,
    synced, then renamed over `path` (the failpoints `written` and `renamed` around the
    rename). Never creates folders: a run directory deleted under a worker is not brought
    back piecemeal."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared runs need the umask's mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        faults.point(written, path)
        os.replace(tmp, path)
        faults.point(renamed, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def tail_lines(path: Path | str, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of a log, reading only its last `max_bytes` (a vLLM log grows large)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return (lines[1:] if size > max_bytes else lines)[-n:]  # the first line may be cut
