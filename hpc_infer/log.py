"""The one way the launcher and serve talk to the user: `[hpc_infer] ...` lines on stderr."""

from __future__ import annotations

import sys


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def printable(text: object) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\n, ...): what we print
    from a run's files (a worker id, an error line, a job state) can never move the cursor,
    recolour the terminal or forge a line of its own."""
    s = str(text)
    return s if s.isprintable() else "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)


def say(msg: str) -> None:
    print(f"[hpc_infer] {msg}", file=sys.stderr, flush=True)
