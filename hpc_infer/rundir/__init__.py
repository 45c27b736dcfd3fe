"""The run-directory protocol: the contract between launcher, workers, status and merge.

Workers and the merger may run on other machines, so the shared file system is the bus.
Every step imports this package and nothing else to read or write a run: paths
(layout.py), the atomic write (files.py), chunk inputs and outputs (chunks.py), claims
(claims.py), which chunk next (claimer.py), notices (notices.py), straggler pacing and
backups (tail.py), others' heartbeats (beats.py), leases and locks (lease.py), engine
attempts and poison bisection (isolate.py), failpoints (faults.py), what may be trusted
(trust.py). Standard library only: workers import it inside the cluster's vLLM image.
"""

from .chunks import (
    TRAILER_KEY,
    ChunkSource,
    chunk_done,
    encode_chunk_output,
    publish_chunk_output,
    read_chunk_source,
    read_chunk_trailer,
)
from .files import (
    UMASKS,
    atomic_file,
    current_umask,
    read_json,
    read_jsonl,
    set_permissions,
    tail_lines,
    write_atomic,
    write_json,
    write_jsonl,
)
from .layout import SUBDIRS, RunDir, read_chunk_records, read_heartbeats, secure_root

__all__ = [
    "atomic_file",
    "TRAILER_KEY",
    "ChunkSource",
    "chunk_done",
    "encode_chunk_output",
    "publish_chunk_output",
    "read_chunk_source",
    "read_chunk_trailer",
    "UMASKS",
    "current_umask",
    "read_json",
    "read_jsonl",
    "set_permissions",
    "tail_lines",
    "write_atomic",
    "write_json",
    "write_jsonl",
    "SUBDIRS",
    "RunDir",
    "read_chunk_records",
    "read_heartbeats",
    "secure_root",
]
