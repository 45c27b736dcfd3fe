"""Check sampling settings against the installed vLLM on the login node, before submission.

Builds the SamplingParams each request will get, with the worker's own code
(vllm_engine.sampling_params), so a typo in sampling.extra or a value vLLM refuses fails
here with the setting named, not in a job an hour later. Where vLLM is not installed
on the login node (it may live only in the cluster's image) the check is skipped and
says so.

Importing vLLM costs a launch 10-15 s, most of its start. The check is a pure function
of its inputs (the settings, the installed vLLM's files, our code that builds the
params), so a passed check is remembered under the user's cache, keyed by all of them:
relaunching a run, or a new run with the same sampling, skips the import. A refusal is
never remembered (it is re-checked, and re-explained, every time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError


def check_run_sampling(rc: Any, overrides: list[dict], input_format: str = "") -> str | None:
    """What launch and sbatch both check: the run's sampling and each distinct per-record
    override (OpenAI batch bodies); pooling tasks sample nothing. Returns the line to log."""
    from ..worker.protocol import POOLING_TASKS

    if rc.model.task in POOLING_TASKS:
        return None
    # OpenAI batch bodies (the only per-record overrides) start from vLLM's server defaults
    # unless data.batch_defaults=run
    base = {} if (input_format == "openai_batch" or overrides) and rc.data.batch_defaults == "server" else None
    return check_sampling(rc.sampling.to_vllm(), overrides, base)


def check_sampling(sampling: dict, overrides: list[dict] | None = None, base: dict | None = None) -> str:
    """Raises UserError naming the run's setting; returns what was checked, for the launch
    log. A request body vLLM refuses is not the run's error: its record will fail alone (an
    error record, as `vllm run-batch` writes an error line), and the log says how many."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        return "sampling not checked against vLLM (not installed here; the workers' image has it)"
    remembered = _remembered(spec, sampling, overrides, base)
    try:
        if remembered:
            return remembered.read_text() + " (this check passed before: remembered)"
    except OSError:  # not checked before (or unreadable): check now
        pass
    import vllm

    from ..worker.vllm_engine import sampling_params

    def build(where: str, kw: dict) -> None:
        try:
            sampling_params(kw)
        except TypeError as e:  # an unknown field
            name = str(e).split("'")[1] if "'" in str(e) else str(e)
            raise UserError(
                f"{where}: {name} is not a SamplingParams field in vLLM {vllm.__version__} "
                f"(sampling.extra.{name}); see vLLM's SamplingParams reference for the fields"
            ) from None
        except Exception as e:  # vLLM's own validation: ValueError / VLLMValidationError
            raise UserError(f"{where}: vLLM {vllm.__version__} refuses these settings: {e}") from None

    build("sampling", sampling)
    refused = []
    for o in {json.dumps(o, sort_keys=True): o for o in (overrides or []) if o}.values():
        try:
            build("a request body", dict(sampling if base is None else base, **o))
        except UserError as e:
            refused.append(str(e))
    note = f"sampling checked against vLLM {vllm.__version__}"
    if refused:
        note += (
            f"; {len(refused)} distinct request bod{'y' if len(refused) == 1 else 'ies'} will fail as error "
            f"records (listed in errors.jsonl at merge), e.g. {refused[0]}"
        )
    if remembered:
        _remember(remembered, note)
    return note


def _remembered(spec, sampling: dict, overrides: list[dict] | None, base: dict | None) -> Path | None:
    """Where a passed check of exactly these inputs is kept: the settings, the installed
    vLLM's files (their size and mtime change on any reinstall), and our code that builds
    the params. None when vLLM's files cannot be read."""
    from ..worker import vllm_engine as engine
    from .cpu_model import cache_root

    try:
        package = Path(next(iter(spec.submodule_search_locations)))
        installed = [
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in (package / "sampling_params.py", package / "version.py", package / "_version.py")
            if f.exists()
        ]
        ours = [Path(engine.__file__).read_bytes(), Path(__file__).read_bytes()]
    except (OSError, StopIteration, TypeError):
        return None
    distinct = sorted({json.dumps(o, sort_keys=True) for o in (overrides or []) if o})
    key = hashlib.sha256(
        json.dumps([str(package), installed, sampling, distinct, base], sort_keys=True, default=str).encode()
    )
    for code in ours:
        key.update(hashlib.sha256(code).digest())
    return cache_root() / "checks" / f"sampling-{key.hexdigest()[:32]}.txt"


def _remember(path: Path, note: str) -> None:
    """Published by one rename, so a concurrent launch reads a whole note or none; a cache
    that cannot be written only costs the next launch the import."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(note)
        os.replace(tmp, path)
    except OSError:
        pass
