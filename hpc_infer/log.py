"""The one way the launcher and serve talk to the user: `[hpc_infer] ...` lines on stderr."""

from __future__ import annotations

import sys


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def say(msg: str) -> None:
    print(f"[hpc_infer] {msg}", file=sys.stderr, flush=True)
