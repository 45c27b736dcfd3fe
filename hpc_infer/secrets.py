"""Find the Hugging Face token and hand it to jobs through the environment only.

The token is never written to a config dump, a script, a submitit pickle, a log or a
command line. Jobs inherit it from the launcher's environment (sbatch exports the
submitting environment by default); inside Apptainer/Singularity it also travels as
APPTAINERENV_/SINGULARITYENV_ variables, which survive --cleanenv.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, safe to print

    def __repr__(self) -> str:  # never show the value, even in a traceback
        return f"Token(source={self.source!r})"


def _hub_token_file() -> Path:
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home).expanduser() / "token"


def find_token(token_file: str | None = None) -> Token | None:
    """HF_TOKEN, HUGGING_FACE_HUB_TOKEN, HF_TOKEN_PATH, the cluster's token file, the hub's file."""
    for var in TOKEN_VARS:
        if os.environ.get(var, "").strip():
            return Token(os.environ[var].strip(), f"${var}")
    candidates = []
    if os.environ.get("HF_TOKEN_PATH"):
        candidates.append((Path(os.environ["HF_TOKEN_PATH"]).expanduser(), "$HF_TOKEN_PATH"))
    if token_file:
        candidates.append((Path(token_file).expanduser(), "cluster.token_file"))
    candidates.append((_hub_token_file(), "the Hugging Face token file"))
    for path, source in candidates:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return Token(value, f"{source} ({path})")
    return None


def job_env(token: Token | None) -> dict[str, str]:
    """Variables to export into the submitting environment so jobs (and images) see the token."""
    if token is None:
        return {}
    env = {}
    for prefix in ("", "APPTAINERENV_", "SINGULARITYENV_"):
        env[f"{prefix}HF_TOKEN"] = token.value
    return env


@contextlib.contextmanager
def exported(env: dict[str, str]) -> Iterator[None]:
    """Temporarily put `env` into os.environ (inherited by sbatch / local workers)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
