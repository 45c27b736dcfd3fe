"""Checks that types cannot make (ranges, combinations, files, what a job script may hold),
each naming the setting and the fix; `to_run_config` is the one way from Hydra's config to
a validated RunConfig."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from .hooks import postprocess_fn
from .schema import CARD_SAMPLING, DTYPES, ROUTER_POLICIES, TASKS, RunConfig, time_to_minutes
from .typos import unknown_keys

KERNEL_FILES = ("/proc/", "/sys/")  # a process's environment, the kernel's state: never a prompt set


def not_a_file(path: str) -> Optional[str]:
    """Why `path` is not a regular file we can read (None when it is one)."""
    import os
    import stat

    p = Path(path).expanduser()
    real = os.path.realpath(p)
    if real.startswith(KERNEL_FILES) or str(p.absolute()).startswith(KERNEL_FILES):
        return (
            f"is a kernel or process file ({real}); it would copy what it holds (a process's environment, "
            f"its secrets) into the run's files. Give a file of yours"
        )
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "does not exist" + (f" (its folder {p.parent} does not exist either)" if not p.parent.exists() else "")
    except PermissionError:
        return "cannot be read (permission denied on a folder on its path)"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return (
            "is a named pipe (FIFO), which can be read once; a relaunch reads the input again to resume, "
            "so copy it to a file"
        )
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    if not os.access(p, os.R_OK):
        return "is not readable by you (check its permissions)"
    return None


HUB_ADDRESS = re.compile(
    r"hf://datasets/(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[A-Za-z0-9_./-]+))?/?"
)


def hub_address(path: str) -> tuple[str, Optional[str]]:
    """hf://datasets/ORG/NAME[@rev] -> (ORG/NAME, rev or None); anything else is refused with the grammar."""
    m = HUB_ADDRESS.fullmatch(path)
    if not m or ".." in m["repo"] or (m["rev"] and ".." in m["rev"]):
        raise UserError(
            f"data.path={path}: not a Hub dataset address; write hf://datasets/ORG/NAME, optionally with a "
            f"revision (a branch, tag or commit): hf://datasets/ORG/NAME@REV. Choose the split and subset with "
            f"data.split=... and data.subset=..."
        )
    return m["repo"], m["rev"]


# a data file's suffix -> the format it is read as: the one list (io/sources.py reads it too)
SHARD_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".arrow": "arrow"}
DATA_SUFFIXES = tuple(SHARD_FORMATS)


def data_files_in(folder: Path, max_depth: int = 4, max_entries: int = 100_000) -> list[Path]:
    """The data files of a folder of shards, in name order: hidden and `_` names skipped,
    at most `max_depth` levels down (the Hub's deepest layout is subset/split/shard), and a
    folder of more than `max_entries` entries refused (not a data set folder: /tmp, $HOME)."""
    import os

    found: list[Path] = []
    seen = 0
    level = [folder]
    for _ in range(max_depth):
        below: list[Path] = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                seen += 1
                if seen > max_entries:
                    raise UserError(
                        f"data.path={folder}: more than {max_entries:,} entries below it, so not a folder of one "
                        f"data set; point data.path at the data set's own folder"
                    )
                if e.name.startswith((".", "_")):
                    continue
                if e.is_dir(follow_symlinks=False):
                    below.append(Path(e.path))
                elif e.is_file() and e.name.lower().endswith(DATA_SUFFIXES):
                    found.append(Path(e.path))
        level = below
    return sorted(found)


def data_path_problem(path: str) -> Optional[str]:
    """Why data.path cannot be read (None when it looks readable): a Hub address is checked
    for its grammar here and fetched when the input is planned; a folder must be one we can list."""
    if path.startswith("hf://"):
        try:
            hub_address(path)
        except UserError as e:
            return str(e).split(": ", 1)[1]
        return None
    p = Path(path).expanduser()
    problem = not_a_file(path)
    if problem != "is a directory, not a file":  # a file, or a kernel folder, or nothing there
        return problem
    if p.is_dir():
        import os

        if not os.access(p, os.R_OK | os.X_OK):
            return "is a folder you cannot list (check its permissions)"
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() or data_files_in(p):
            return None
        return (
            "is a directory with no .parquet, .jsonl or .arrow files (nor a datasets save_to_disk "
            "state.json); give the prompt file, or a folder of shards"
        )
    return not_a_file(path)


def not_writable(folder: str) -> Optional[str]:
    """Why runs cannot be created under `folder` (None when they can); looks up to the
    nearest existing ancestor, since output_root is created on first use."""
    import os

    p = Path(folder).expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"cannot hold runs: {p} is not a directory"
    import tempfile

    try:  # a real probe: permission bits say nothing for root, read-only mounts or /proc
        os.rmdir(tempfile.mkdtemp(prefix=".hpc_infer-probe.", dir=p))
    except OSError as e:
        return (
            f"is not writable by you ({p}: {e.strerror}); set output_root to a folder of yours, "
            f"e.g. output_root=$HOME/runs"
        )
    return None


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _control(value: Any) -> bool:
    return isinstance(value, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in value)


def script_safe(rc: RunConfig) -> list[str]:
    """Values that end up in a rendered job.sbatch (and in submitit's), line by line: no
    control character in any (a newline in a partition would start a shell line of its
    own), env keys valid shell names. Values are quoted for the shell where rendered."""
    c = rc.cluster
    problems = []
    fields = {
        f"cluster.{k}": getattr(c, k)
        for k in (
            "partition",
            "account",
            "qos",
            "gres",
            "mem",
            "time",
            "token_file",
            "compile_cache",
            "model_catalog",
            "python",
        )
    }
    fields.update({f"cluster.sbatch_extra[{i}]": v for i, v in enumerate(c.sbatch_extra)})
    fields.update({f"cluster.setup[{i}]": v for i, v in enumerate(c.setup)})
    fields.update({f"cluster.container.{k}": v for k, v in vars(c.container).items() if isinstance(v, str)})
    fields.update({f"cluster.container.binds[{i}]": v for i, v in enumerate(c.container.binds)})
    fields.update({f"cluster.container.extra_args[{i}]": v for i, v in enumerate(c.container.extra_args)})
    fields.update(
        {
            "model.name": rc.model.name,
            "model.path": rc.model.path,
            "data.name": rc.data.name,
            "sampling.name": rc.sampling.name,
            "output_root": rc.output_root,
            "run_name": rc.run_name,
            "run_group": rc.run_group,
        }
    )
    for key, value in c.env.items():
        if not ENV_NAME.fullmatch(str(key)):
            problems.append(
                f"cluster.env.{key}: not a valid environment variable name (letters, digits, _; not "
                f"starting with a digit)"
            )
        fields[f"cluster.env.{key}"] = value
    for key in ("partition", "account", "qos", "gres", "mem", "time"):
        value = getattr(c, key)
        if isinstance(value, str) and any(ch.isspace() for ch in value):
            problems.append(
                f"cluster.{key}={value!r}: holds a space, which would make the rest of the value extra "
                f"#SBATCH options; Slurm's {key} values have none (several: separate them with commas)"
            )
    for i, opt in enumerate(c.sbatch_extra):
        if isinstance(opt, str) and any(ch.isspace() for ch in opt.strip()) and "=" not in opt.split()[0]:
            problems.append(
                f"cluster.sbatch_extra[{i}]={opt!r}: one option a line, written --name=value (a space "
                f"would pass the rest as another option)"
            )
    for where, value in fields.items():
        if _control(value):
            problems.append(
                f"{where}: holds a control character (a newline, tab, ...), which would start a new line "
                f"in the job script; remove it"
            )
    return problems


def validate(rc: RunConfig) -> None:
    errors: list[str] = []

    def check(ok: bool, setting: str, msg: str) -> None:
        if not ok:
            errors.append(f"{setting}: {msg}")

    m, c, s, d = rc.model, rc.cluster, rc.sampling, rc.data
    check(m.task in TASKS, "model.task", f"'{m.task}' is not one of {', '.join(TASKS)}")
    check(
        m.task != "score" or bool(d.pair_field),
        "data.pair_field",
        "model.task=score compares each record's text with a second text: name its field, e.g. data.pair_field=document",
    )
    if m.lora_path is not None:
        check(
            (Path(m.lora_path).expanduser() / "adapter_config.json").is_file(),
            "model.lora_path",
            f"{m.lora_path} has no adapter_config.json (a PEFT LoRA adapter directory is expected)",
        )
    check(bool(m.hf_id or m.path or m.builtin), f"model={m.name}", "set model.hf_id or model.path")
    check(m.tensor_parallel_size >= 1, "model.tensor_parallel_size", "must be >= 1")
    check(m.dtype in DTYPES, "model.dtype", f"'{m.dtype}' is not one of {', '.join(DTYPES)}")
    check(m.max_model_len is None or m.max_model_len >= 16, "model.max_model_len", f"{m.max_model_len} must be >= 16")
    check(
        m.max_model_len is None or s.max_tokens < m.max_model_len,
        "sampling.max_tokens",
        f"{s.max_tokens} leaves no room for the prompt in model.max_model_len={m.max_model_len}",
    )
    check(
        m.gpu_memory_utilization is None or 0 < m.gpu_memory_utilization <= 1,
        "model.gpu_memory_utilization",
        f"{m.gpu_memory_utilization} must be in (0, 1]",
    )
    check(m.pipeline_parallel_size >= 1, "model.pipeline_parallel_size", "must be >= 1")
    if m.chat_template:
        problem = not_a_file(m.chat_template)
        check(problem is None, "model.chat_template", f"{m.chat_template} {problem}")
    errors += script_safe(rc)
    unknown = sorted(set(m.sampling_defaults) - set(CARD_SAMPLING))
    check(
        not unknown,
        "model.sampling_defaults",
        f"{unknown} are not model-card sampling fields; use {', '.join(CARD_SAMPLING)}",
    )
    check(
        c.backend in ("slurm", "local", "debug"), "cluster.backend", f"'{c.backend}' is not one of slurm, local, debug"
    )
    check(c.workers >= 1, "cluster.workers", f"{c.workers} must be >= 1")
    check(c.nodes_per_task >= 1, "cluster.nodes_per_task", f"{c.nodes_per_task} must be >= 1")
    check(c.gpus_per_task >= 0, "cluster.gpus_per_task", "must be >= 0")
    check(c.max_chunks_in_flight >= 1, "cluster.max_chunks_in_flight", "must be >= 1")
    check(c.max_backups >= 0, "cluster.max_backups", "must be >= 0 (0 turns backup copies off)")
    check(c.max_attempts >= 1, "cluster.max_attempts", "must be >= 1")
    check(c.max_resubmits >= 0, "cluster.max_resubmits", "must be >= 0 (0: never resubmit)")
    try:
        time_to_minutes(c.time)
    except UserError as e:
        errors.append(str(e).replace("cluster.time=", "cluster.time: ", 1))
    check(
        c.mem is None or re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", str(c.mem), re.I) is not None,
        "cluster.mem",
        f"'{c.mem}' is not a Slurm memory size; write e.g. 40G or 512M",
    )
    check(c.lease_s > c.heartbeat_s * 2, "cluster.lease_s", "must exceed twice cluster.heartbeat_s")
    check(c.signal_lead_s >= 10, "cluster.signal_lead_s", "must be >= 10 (seconds of warning before the time limit)")
    check(rc.serve.max_restarts >= 0, "serve.max_restarts", "must be >= 0 (0: a dead server is not restarted)")
    check(rc.serve.restart_backoff_s >= 0, "serve.restart_backoff_s", "must be >= 0")
    check(
        not c.compile_cache or "$" in c.compile_cache or Path(c.compile_cache).expanduser().is_absolute(),
        "cluster.compile_cache",
        f"'{c.compile_cache}' is relative; give an absolute directory every worker sees "
        "(shared storage), or a node-local one like /tmp/vllm-compile",
    )
    if c.container.image and not c.container.image.startswith(("docker://", "library://", "oras://")):
        check(
            Path(c.container.image).exists(),
            "cluster.container.image",
            f"image {c.container.image} does not exist (pull it with `hpc-infer image pull`, or fix the path)",
        )
    check(
        c.container.runtime in (None, "apptainer", "singularity"),
        "cluster.container.runtime",
        f"'{c.container.runtime}' is not one of apptainer, singularity",
    )
    check(s.n >= 1, "sampling.n", f"{s.n} must be >= 1")
    check(s.temperature >= 0, "sampling.temperature", f"{s.temperature} must be >= 0")
    check(0 < s.top_p <= 1, "sampling.top_p", f"{s.top_p} must be in (0, 1]")
    check(s.top_k >= -1, "sampling.top_k", f"{s.top_k} must be >= 0 (0 disables)")
    check(0 <= s.min_p <= 1, "sampling.min_p", f"{s.min_p} must be in [0, 1]")
    check(s.max_tokens >= 1, "sampling.max_tokens", f"{s.max_tokens} must be >= 1")
    check(0 <= s.min_tokens <= s.max_tokens, "sampling.min_tokens", "must be in [0, max_tokens]")
    check(s.repetition_penalty > 0, "sampling.repetition_penalty", "must be > 0")
    check(-2 <= s.presence_penalty <= 2, "sampling.presence_penalty", "must be in [-2, 2]")
    check(-2 <= s.frequency_penalty <= 2, "sampling.frequency_penalty", "must be in [-2, 2]")
    if s.structured is not None:
        kinds = {"json", "regex", "choice", "grammar", "json_object", "structural_tag"}
        options = {"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}
        spec = s.structured if isinstance(s.structured, dict) else {}
        unknown = sorted(set(spec) - kinds - options)
        check(
            isinstance(s.structured, dict) and not unknown,
            f"sampling.structured{'.' + unknown[0] if unknown else ''}",
            f"unknown; give exactly one of {', '.join(sorted(kinds))}",
        )
        check(
            len(set(spec) & kinds) == 1 or unknown,
            "sampling.structured",
            f"give exactly one of {', '.join(sorted(kinds))} (got {', '.join(sorted(set(spec) & kinds)) or 'none'})",
        )
    check(
        d.format in ("auto", "jsonl", "json", "openai_batch", "parquet", "csv", "txt", "arrow"),
        "data.format",
        f"'{d.format}' is not one of auto, jsonl, openai_batch, parquet, csv, txt, arrow",
    )
    problem = data_path_problem(d.path)
    check(
        problem is None,
        "data.path",
        f"{d.path} {problem}; give the prompt file (jsonl, parquet, csv, txt), a folder of shards, "
        f"or hf://datasets/ORG/NAME",
    )
    for key in ("split", "subset"):
        value = getattr(d, key)
        check(
            value is None or (isinstance(value, str) and re.fullmatch(r"[\w.-]+", value) is not None),
            f"data.{key}",
            f"'{value}' is not a {key} name (letters, digits, '_', '-', '.')",
        )
    if d.template_file:
        problem = not_a_file(d.template_file)
        check(problem is None, "data.template_file", f"{d.template_file} {problem}")
    check(d.limit is None or d.limit >= 1, "data.limit", "must be >= 1")
    check(d.group_prefixes in ("auto", "off"), "data.group_prefixes", f"'{d.group_prefixes}' is not one of auto, off")
    check(d.max_line_bytes >= 1, "data.max_line_bytes", "must be >= 1")
    check(rc.chunks_per_worker >= 1, "chunks_per_worker", "must be >= 1")
    check(
        rc.merge.format in ("jsonl", "parquet", "openai_batch"),
        "merge.format",
        f"'{rc.merge.format}' is not one of jsonl, parquet, openai_batch",
    )
    check(
        rc.merge.on_error in ("keep", "drop", "fail"),
        "merge.on_error",
        f"'{rc.merge.on_error}' is not one of keep (error records stay in the results), drop, fail (exit 3)",
    )
    check(
        rc.data.too_long in ("error", "mark", "truncate"),
        "data.too_long",
        f"'{rc.data.too_long}' is not one of error (refuse before submission), mark (error records), truncate",
    )
    check(
        rc.data.batch_defaults in ("server", "run"),
        "data.batch_defaults",
        f"'{rc.data.batch_defaults}' is not one of server (vLLM's server defaults, as run-batch), run (the "
        f"run's sampling group)",
    )
    name = rc.resolved_run_name
    check(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,199}", name) is not None,
        "run_name",
        f"{name!r} must be one plain name (letters, digits and ._+=@,- ; no '/', spaces, or leading '.'): "
        f"it becomes a directory under output_root and appears unquoted in #SBATCH lines",
    )
    check(rc.max_chunk_records >= 1, "max_chunk_records", "must be >= 1")
    check(rc.serve.replicas >= 1, "serve.replicas", f"{rc.serve.replicas} must be >= 1")
    check(
        rc.serve.router_policy in ROUTER_POLICIES,
        "serve.router_policy",
        f"'{rc.serve.router_policy}' is not one of {', '.join(ROUTER_POLICIES)}",
    )
    check(rc.serve.router_port is None or 0 < rc.serve.router_port <= 65535, "serve.router_port", "must be in 1..65535")
    check(rc.serve.router_cpus >= 1, "serve.router_cpus", "must be >= 1")
    check(
        0 < rc.serve.port_min < rc.serve.port_max <= 65535,
        "serve.port_min",
        "serve.port_min < serve.port_max must lie in 1..65535",
    )
    check(rc.serve.idle_minutes is None or rc.serve.idle_minutes > 0, "serve.idle_minutes", "must be > 0 (or null)")
    check(c.endpoint_concurrency >= 1, "cluster.endpoint_concurrency", "must be >= 1")
    check(
        rc.permissions in ("private", "group", "umask"),
        "permissions",
        f"'{rc.permissions}' is not one of private, group, umask",
    )
    check(
        rc.permissions != "group" or bool(rc.run_group),
        "run_group",
        "permissions=group needs the group that may read the run, e.g. run_group=myproject",
    )
    if rc.run_group:
        import grp

        try:
            grp.getgrnam(rc.run_group)
        except KeyError:
            errors.append(f"run_group: no group named {rc.run_group!r} on this machine (see `id -Gn`)")
    problem = not_writable(rc.output_root)
    check(problem is None, "output_root", f"{rc.output_root} {problem}")
    if rc.postprocess is not None:
        try:
            postprocess_fn(rc.postprocess)
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Turn Hydra's DictConfig into typed dataclasses, then validate."""
    from ..secrets import SECRET_ADVICE, secrets_in

    tree = OmegaConf.to_container(cfg, resolve=False)
    found = secrets_in(tree)
    if found:
        raise UserError(f"{', '.join(found)}: {SECRET_ADVICE} (value not shown)")
    unknown = unknown_keys(tree, RunConfig)
    if unknown:
        raise UserError("invalid configuration:\n  " + "\n  ".join(unknown))
    # What is written is the resolved config: `${oc.env:...}` or any interpolation that pulls a
    # secret in must be caught after resolution, not only as typed
    from ..secrets import known_secrets, secrets_in_resolved

    from ..secrets import redact

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # a missing variable, a bad interpolation: name it (never a value it resolved to)
        raise UserError(f"invalid configuration: {redact(str(e))}") from None
    found = secrets_in_resolved(resolved, known_secrets())
    if found:
        raise UserError(f"{', '.join(found)}: resolves to a secret; {SECRET_ADVICE} (value not shown)")
    try:
        rc = OmegaConf.to_object(cfg)
    except Exception as e:  # omegaconf reports the key and the offending value (a secret blanked out)
        raise UserError(f"invalid configuration: {redact(str(e))}") from None
    if not isinstance(rc, RunConfig):
        raise UserError("configuration root is not a RunConfig (is conf/config.yaml's defaults list intact?)")
    validate(rc)
    return rc
