"""The shell commands the README and docs/ show, as a user would copy them.

`shown()` reads every ```bash block (and the README's unlabelled opening block): one
command a line, `\\` continuations joined, a trailing `# comment` dropped. `as_written()`
hands a test one of them, failing when no doc shows it any more, with the placeholders a
doc uses (runs/<run>, RUN, N, `...`, /data/models, ...) filled in by the test: the rest
of the line is run exactly as printed. tests/test_doc_claims.py checks that every shown
command is run by a test this way, or that its doc says why the tests cannot run it; and
conftest.py observes it: the bash that runs a line records it (tests/doc_observer.sh), and at
the end of a whole-suite session a shown command that no shell of a *passing* test ran fails
the session.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell")
COMMAND_START = re.compile(
    r"^(hpc-infer|python -m|\.venv/|bash |export |srun |sbatch |singularity |lm_eval |git |"
    r"HPC_INFER_VENV=|/shared/|~/)"
)


def _commands(block: str) -> list[str]:
    out, pending = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment (never inside our quoted words)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def shown() -> dict[str, list[tuple[str, int]]]:
    """command -> [(doc name, line number)] for every command a doc shows."""
    found: dict[str, list[tuple[str, int]]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            lang, body = m.group(1), m.group(2)
            if lang not in SHELL and lang != "":
                continue
            line_no = text.count("\n", 0, m.start(2)) + 1
            for cmd in _commands(body):
                if lang == "" and not COMMAND_START.match(cmd):
                    continue  # an unlabelled block: a file tree, a message
                found.setdefault(cmd, []).append((doc.name, line_no))
    return found


ASKED: dict[str, set[tuple[str, str]]] = {}  # test node id -> (doc command, the line made of it)


def as_written(command: str, fill: dict[str, str] | None = None) -> str:
    """`command` as a doc shows it, placeholders replaced: fill={"runs/<run>": "runs/x"}.
    Keys are the doc's own placeholder text (one fill can serve several commands). The
    asking test and the line are recorded: the command counts as observed running once the
    test passes and a shell it started (conftest.user_env's bash) recorded running that line."""
    assert command in shown(), f"no doc shows {command!r} any more: update the test with the doc"
    line = command
    for placeholder, value in (fill or {}).items():
        line = line.replace(placeholder, value)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if test:
        ASKED.setdefault(test, set()).add((command, line))
    return line
