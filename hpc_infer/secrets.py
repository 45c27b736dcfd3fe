"""Find the Hugging Face token and hand it to jobs through the environment only.

The token is never written to a config dump, a script, a submitit pickle, a log or a
command line. Jobs inherit it from the launcher's environment (sbatch exports the
submitting environment by default); inside Apptainer/Singularity it also travels as
APPTAINERENV_/SINGULARITYENV_ variables, which survive --cleanenv.
"""

from __future__ import annotations

import contextlib
import re
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


# --- secrets that must never reach a run's files: one check for every entry point ---------

SECRET_KEY = re.compile(
    r"(^|[_\-])(token|auth|pwd|dsn)$|pass|secret|api_?key|credential|private_?key|_key$",
    re.I,
)  # SSHPASS, MYSQL_PWD, AWS_SECRET_ACCESS_KEY, SENTRY_DSN, *_KEY, *CREDENTIAL*
NOT_SECRET_SUFFIX = ("_file", "_path", "_dir", "_env", "_var")  # token_file names where a secret lives, not it
TOKEN_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|ghp_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|glpat-[A-Za-z0-9_\-]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16})"
    r"|\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@"
    r"|\b[A-Za-z][A-Za-z0-9+.\-]*://[A-Za-z0-9_\-.~%]{20,}@"
)  # a URL with a password (postgres://u:p@host) or a token as its user (https://TOKEN@host) in it


NOT_SECRET = ("passenv", "pwd", "oldpwd")  # the container's variables to pass on; the shell's folders


def secret_key(name: str) -> bool:
    low = name.lower()
    return bool(SECRET_KEY.search(name)) and not low.endswith(NOT_SECRET_SUFFIX) and low not in NOT_SECRET


def looks_like_token(value: object) -> bool:
    return isinstance(value, str) and bool(TOKEN_VALUE.search(value))


def secrets_in(tree: object, path: str = "") -> list[str]:
    """Dotted paths of secret-named keys with a value, and of values that look like tokens."""
    found: list[str] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            p = f"{path}.{k}" if path else str(k)
            if secret_key(str(k)) and v not in (None, "") and not isinstance(v, (dict, list, bool)):
                found.append(p)
            else:
                found += secrets_in(v, p)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            found += secrets_in(v, f"{path}[{i}]")
    elif looks_like_token(tree):
        found.append(path)
    return found


SECRET_ADVICE = (
    "secrets do not belong in the config: it is saved in the run directory, the sbatch script and "
    "the job's files. Export the token in your shell (HF_TOKEN=...) or put it in "
    "~/.cache/huggingface/token (or cluster.token_file), and remove it from the command line and config"
)


def known_secrets() -> list[str]:
    """The secret values this process can see: the HF token wherever find_token looks, and
    every secret-named environment variable (OPENAI_API_KEY, WANDB_API_KEY, ...). A config
    value holding one is refused even when it does not look like a token."""
    values = []
    token = find_token()
    if token:
        values.append(token.value)
    values += [v.strip() for k, v in os.environ.items() if secret_key(k) and len(v.strip()) >= 8]
    return sorted(set(values))


def holds_secret(value: object, secrets: list[str]) -> bool:
    return isinstance(value, str) and (looks_like_token(value) or any(s in value for s in secrets))


def secrets_in_resolved(tree: object, secrets: list[str], path: str = "") -> list[str]:
    """Dotted paths of values that, resolved (interpolations filled in), hold a known secret
    or look like a token: what would actually be written to config.yaml, worker.json, the
    script, the run directory's name and the job name."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in secrets_in_resolved(v, secrets, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in secrets_in_resolved(v, secrets, f"{path}[{i}]")]
    return [path] if holds_secret(tree, secrets) else []


ENV_INTERPOLATION = re.compile(r"\$\{\s*oc\.env\s*:\s*['\"]?([^,}\s'\"]+)")


def refuse_secret_overrides(argv: list[str]) -> None:
    """Before Hydra writes anything (multirun.yaml) or echoes a value: refuse secrets on the
    command line, including `${oc.env:VAR}` interpolations that would pull one in."""
    from .errors import UserError

    secrets = known_secrets()
    for arg in argv:
        for var in ENV_INTERPOLATION.findall(arg):
            if secret_key(var) or var in TOKEN_VARS or holds_secret(os.environ.get(var, ""), secrets):
                raise UserError(
                    f"{arg.split('=', 1)[0].lstrip('+~')}: reads ${{oc.env:{var}}}, a secret; "
                    f"{SECRET_ADVICE} (value not shown)"
                )
        if holds_secret(arg, secrets) and not looks_like_token(arg):
            raise UserError(
                f"{arg.split('=', 1)[0].lstrip('+~') if '=' in arg else 'an argument'}: holds the value "
                f"of a secret from your environment: {SECRET_ADVICE} (value not shown)"
            )
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            if looks_like_token(arg):
                raise UserError(f"a command-line argument looks like a token (value not shown): {SECRET_ADVICE}")
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if (secret_key(key.split(".")[-1]) and value.strip() not in ("", "null")) or looks_like_token(value):
            raise UserError(f"{key}: {SECRET_ADVICE} (value not shown)")
        # every value a sweep expands to ({A: 1},{MY_TOKEN: ...}; choice(...); a list or dict), as
        # Hydra's own override parser reads it, before Hydra writes multirun.yaml
        for point in _override_values(value):
            found = [f"{key}{p if p.startswith('[') else '.' + p}" for p in secrets_in(point)]
            found += [key for s in _strings(point) if holds_secret(s, secrets)]
            if found:
                raise UserError(f"{', '.join(sorted(set(found)))}: {SECRET_ADVICE} (value not shown)")


def _override_values(value: str) -> list[object]:
    """Each value an override's right-hand side gives, as Hydra's grammar reads it: one for a
    plain value, each element of a sweep (`a,b`, `choice(...)`, `glob(...)` left as text)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import ChoiceSweep

        parsed = OverridesParser.create().parse_override(f"x={value}").value()
    except Exception:
        return [value]
    if isinstance(parsed, ChoiceSweep):
        return list(parsed.list)
    return [parsed]


def _strings(tree: object) -> list[str]:
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in [str(k), *_strings(v)]]
    if isinstance(tree, (list, tuple)):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


def redact(text: str) -> str:
    """`text` with every secret this process can see, and anything token-like, blanked out:
    for messages that echo a resolved value (OmegaConf's conversion errors do)."""
    for value in sorted(known_secrets(), key=len, reverse=True):
        text = text.replace(value, "<secret not shown>")
    return TOKEN_VALUE.sub("<secret not shown>", text)
