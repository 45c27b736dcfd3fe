"""Check sampling settings against the installed vLLM on the login node, before submission.

Builds the SamplingParams each request will get, with the worker's own code
(engine.sampling_params), so a typo in sampling.extra or a value vLLM refuses fails
here with the setting named, not in a job an hour later. Where vLLM is not installed
on the login node (it may live only in the cluster's image) the check is skipped and
says so.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from ..errors import UserError


def check_run_sampling(rc: Any, overrides: list[dict], input_format: str = "") -> str | None:
    """What launch and sbatch both check: the run's sampling and each distinct per-record
    override (OpenAI batch bodies); pooling tasks sample nothing. Returns the line to log."""
    from ..worker.engine import POOLING_TASKS

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
    if importlib.util.find_spec("vllm") is None:
        return "sampling not checked against vLLM (not installed here; the workers' image has it)"
    import vllm

    from ..worker.engine import sampling_params

    def build(where: str, kw: dict) -> None:
        try:
            sampling_params(kw)
        except TypeError as e:  # an unknown field
            name = str(e).split("'")[1] if "'" in str(e) else str(e)
            raise UserError(f"{where}: {name} is not a SamplingParams field in vLLM {vllm.__version__} "
                            f"(sampling.extra.{name}); see vLLM's SamplingParams reference for the fields") from None
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
        note += (f"; {len(refused)} distinct request bod{'y' if len(refused) == 1 else 'ies'} will fail as error "
                 f"records (listed in errors.jsonl at merge), e.g. {refused[0]}")
    return note
