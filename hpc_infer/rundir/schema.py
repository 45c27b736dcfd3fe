"""The shapes of the files a run directory holds, checked as they are read back.

A run's manifest and worker.json decide what every worker reads and runs; a file edited
by hand or by someone else (or damaged) must fail naming the file and the key, never
reach the code as a dict of surprises. Each shape lists every key the writer puts there
(run/plan.py): an unknown key, a missing one or a wrong type is refused. Standard library
only (the worker reads through it).

Heartbeats and a serve run's state files are checked by type for the keys their readers
use, and a key not listed is ignored, not refused: a worker's state carries keys that vary by what it went through
(pacing, isolation), and a heartbeat that cannot be read counts as none (its claims age
on their own), which is worse than an extra key nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NUM = "number"  # int or float, never bool
ANY = "any"


@dataclass(frozen=True)
class Shape:
    required: dict[str, Any]
    optional: dict[str, Any] = field(default_factory=dict)
    extra_ok: bool = False  # keys not listed: ignored (heartbeats) or refused (the rest)


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    key: type
    value: Any


def _type_name(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    if spec is None:
        return "null"
    if isinstance(spec, (Shape, MapOf)):
        return "an object"
    if isinstance(spec, ListOf):
        return "a list"
    return (
        spec
        if isinstance(spec, str)
        else {"int": "a whole number", "str": "a string"}.get(spec.__name__, f"a {spec.__name__}")
    )


def problems(value: Any, spec: Any, at: str = "") -> list[str]:
    """What is wrong with `value` against `spec`, each naming where (`chunks[3].bytes`)."""
    if isinstance(spec, tuple):
        found = [problems(value, s, at) for s in spec]
        return [] if any(not p for p in found) else [f"{at or 'the file'}: must be {_type_name(spec)}"]
    if spec == ANY:
        return []
    if spec is None:
        return [] if value is None else [f"{at}: must be null"]
    if spec == NUM:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{at}: must be a number"]
    if isinstance(spec, type):
        ok = isinstance(value, spec) and (spec is bool or not isinstance(value, bool))
        return [] if ok else [f"{at or 'the file'}: must be {_type_name(spec)}"]
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return [f"{at}: must be a list"]
        return [p for k, v in enumerate(value) for p in problems(v, spec.item, f"{at}[{k}]")]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return [f"{at}: must be an object"]
        out = []
        for k, v in value.items():
            if not isinstance(k, spec.key):
                out.append(f"{at}: key {k!r} must be {_type_name(spec.key)}")
            out += problems(v, spec.value, f"{at}.{k}" if at else str(k))
        return out
    if isinstance(spec, Shape):
        if not isinstance(value, dict):
            return [f"{at or 'the file'}: must be an object"]
        out = [f"{at + '.' if at else ''}{k}: missing" for k in spec.required if k not in value]
        known = {**spec.required, **spec.optional}
        for k, v in value.items():
            where = f"{at}.{k}" if at else str(k)
            if k in known:
                out += problems(v, known[k], where)
            elif not spec.extra_ok:
                out.append(f"{where}: not a key hpc_infer writes there")
        return out
    raise TypeError(f"not a shape: {spec!r}")


OPT_STR = (str, None)

CHUNK = Shape(
    {
        "id": int,
        "n_records": int,
        "est_tokens": NUM,
        "first_index": int,
        "last_index": int,
        "offset": (int, None),
        "bytes": int,
        "crc32": (int, None),
        "first_line": int,
        "max_chars": int,
    },
    {"positions": ListOf(int)},  # a prefix-grouped chunk: its records' rows in order.bin
)

MANIFEST = Shape(
    {
        "version": int,
        "created": NUM,
        "input": str,
        "source": (dict, None),
        "n_records": int,
        "input_bytes": int,
        "n_chunks": int,
        "est_tokens": NUM,
        "fingerprint": MapOf(str, str),
        "chunks": ListOf(CHUNK),
        "grouped": (dict, None),
    }
)

MODEL = Shape(
    {
        "path": str,
        "task": str,
        "engine_kwargs": MapOf(str, ANY),  # engine flags: every value is vLLM's to judge
        "tuned_from": OPT_STR,
        "chat_template": OPT_STR,
        "pair_field": OPT_STR,
        "lora": (Shape({"path": str, "name": str, "max_rank": (int, None)}), None),
        "served_name": str,
        "aliases": ListOf(str),
        "compile_cache": OPT_STR,
    }
)

WORKER = Shape(
    {
        "model": MODEL,
        "input": dict,
        "sampling": dict,
        "seed": (int, None),
        "batch_defaults": str,
        "env": MapOf(str, str),
        "lease_s": NUM,
        "heartbeat_s": NUM,
        "max_chunks_in_flight": int,
        "max_backups": int,
        "straggler_pacing": bool,
        "max_attempts": int,
        "permissions": str,
        "gpus_per_worker": NUM,
        "too_long": dict,
        "endpoint": (dict, None),
    }
)

HEARTBEAT = Shape(
    {"worker": str, "state": str},
    {
        "host": str,
        "pid": int,
        "started": NUM,
        "pid_start": (NUM, None),
        "python": OPT_STR,
        "t": NUM,
        "earlier_s": NUM,
        "ran_s": NUM,
        "segments": int,
        "in_flight": MapOf(str, int),
        "held": ListOf(int),
        "chunks_done": int,
        "records_done": int,
        "prompt_tokens": int,
        "output_tokens": int,
        "in_flight_tokens": int,
        "in_flight_prompt_tokens": int,
        "generating_tokens": int,
        "running": int,
        "finish_s": (NUM, None),
        "finish_at": (NUM, None),
        "recent": ListOf(ListOf(NUM)),
        "engine_start_s": (NUM, None),
        "finished_at": (NUM, None),
        "abandoned": int,
        "backups": int,
        "error": OPT_STR,
    },
    extra_ok=True,
)

# a serve run's state files (serve/replica.py, serve/router.py): typed like heartbeats
_PROCESS = {"job_id": str, "host": str, "pid": int, "pid_start": (NUM, None), "started": NUM, "t": NUM}
REPLICA_STATE = Shape(
    {"replica": int, "state": str},
    {
        **_PROCESS,
        "port": (int, None),
        "url": OPT_STR,
        "ready_at": (NUM, None),
        "server_pid": (int, None),
        "moved_from": (int, None),
    },
    extra_ok=True,
)
ROUTER_STATE = Shape(
    {"state": str},
    {**_PROCESS, "url": OPT_STR, "port": (int, None), "server_pid": (int, None), "workers": list, "policy": str},
    extra_ok=True,
)

SHARED_LISTING = Shape(  # claims/notices/listing: one worker's listing of the run, for the others
    {
        "token": str,
        "n_chunks": int,
        "freed": ListOf(str),
        "free": ListOf(int),
        "more_free": bool,
        "pool": ListOf(int),
        "all_done": bool,
    }
)

BY_NAME = {"manifest.json": MANIFEST, "worker.json": WORKER}


def semantic(name: str, value: dict) -> list[str]:
    """What the types cannot say: a manifest's chunk table is the chunks 0..n-1, in order."""
    if name == "manifest.json" and not problems(value, MANIFEST):
        if value["n_chunks"] != len(value["chunks"]):
            return [f"n_chunks: {value['n_chunks']}, but the chunk table has {len(value['chunks'])}"]
        bad = [k for k, c in enumerate(value["chunks"]) if c["id"] != k]
        if bad:
            return [f"chunks[{bad[0]}].id: {value['chunks'][bad[0]]['id']}, not {bad[0]}"]
    return []
