"""Typed run configuration: Hydra's YAML groups are checked against these dataclasses.

The schemas are registered in Hydra's ConfigStore, so an unknown key or a wrong type
in `conf/` or on the command line fails inside Hydra with the key's name. `validate`
then checks what types cannot (ranges, combinations) and names the setting and fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


TASKS = ("auto", "generate", "chat", "embed", "classify", "score")


@dataclass
class ModelConfig:
    name: str = MISSING
    hf_id: Optional[str] = None  # Hugging Face repo id, e.g. Qwen/Qwen2.5-Math-1.5B
    path: Optional[str] = None  # explicit local directory; wins over everything else
    local_paths: List[str] = field(default_factory=list)  # known shared copies; the first that exists is used
    builtin: Optional[str] = None  # a model this package builds offline (the CPU default)
    revision: Optional[str] = None
    # auto (chat for `messages` records, else generate) | generate | chat | embed | classify | score
    task: str = "auto"
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    trust_remote_code: bool = False
    quantization: Optional[str] = None
    # vLLM's weight loader: auto | safetensors | runai_streamer | fastsafetensors | sharded_state
    # (a copy from `hpc-infer cache shard`) | ...; its package and the checkpoint are pre-flight checked
    load_format: Optional[str] = None
    enforce_eager: bool = False
    gpu_memory_utilization: Optional[float] = None
    chat_template: Optional[str] = None  # path to a Jinja chat template file
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM argument
    # The model card's recommended sampling (temperature, top_p, top_k, min_p,
    # repetition_penalty), as vLLM's server takes a model's generation_config.json: the
    # `chat` and `default` sampling groups use it for what the command line leaves out.
    sampling_defaults: Dict[str, Any] = field(default_factory=dict)
    # One LoRA adapter (a PEFT directory) applied to every request; sets vLLM's enable_lora.
    lora_path: Optional[str] = None
    lora_max_rank: int = 64  # vLLM's max_lora_rank: at least the adapter's r


@dataclass
class ContainerConfig:
    image: Optional[str] = None  # .sif path or docker:// URI; None runs on the host
    runtime: Optional[str] = None  # apptainer | singularity; detected from PATH when None
    binds: List[str] = field(default_factory=list)
    nv: bool = True  # --nv: expose the node's NVIDIA GPUs
    extra_args: List[str] = field(default_factory=list)
    python: str = "python3"  # the interpreter inside the image
    # --cleanenv: the job sees only the variables named here (a name, or a prefix ending
    # in *), forwarded by hpc_infer/cluster/container_exec.sh; the worker sets cluster.env itself.
    cleanenv: bool = False
    passenv: List[str] = field(
        default_factory=lambda: [
            "SLURM_*",
            "SUBMITIT_*",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_*",
            "TMPDIR",
            "MASTER_ADDR",
            "MASTER_PORT",
            "RAY_*",
            "VLLM_*",
            "OMP_NUM_THREADS",
        ]
    )


@dataclass
class ClusterConfig:
    name: str = MISSING
    backend: str = "slurm"  # slurm | local | debug
    workers: int = 1  # array tasks (slurm) or processes (local)
    nodes_per_task: int = 1  # >1: one model over several nodes with Ray (hpc-infer sbatch, or serve on Slurm)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_task: int = 1
    gres: Optional[str] = None  # overrides gpu:<gpus_per_task>
    gpu_type: Optional[str] = None  # e.g. A100, H100, L40S: memory and bf16 support for the pre-flight check
    gpu_mem_gb: Optional[float] = None  # GPU memory in GiB (overrides gpu_type's)
    cpus_per_task: int = 8
    mem: Optional[str] = "40G"
    time: str = "04:00:00"
    array_parallelism: Optional[int] = None  # the %N of --array
    max_array_size: Optional[int] = None  # None: read MaxArraySize from scontrol
    sbatch_extra: List[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. "--constraint=a100"
    setup: List[str] = field(default_factory=list)  # shell lines run before the worker (module load ...)
    env: Dict[str, str] = field(default_factory=dict)  # environment for the worker (no secrets)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    # The interpreter command workers run on the nodes without an image (default: the one
    # this command runs in): a venv on shared storage, or a wrapper (`/opt/site/run python3`).
    python: Optional[str] = None
    model_roots: List[str] = field(default_factory=list)  # shared read-only model directories
    model_catalog: Optional[str] = None  # catalog.json written by `hpc-infer cache catalog`
    hf_home: Optional[str] = None  # shared Hugging Face cache
    token_file: Optional[str] = None  # where to look for the HF token
    lease_s: float = 600.0  # a claim not refreshed for this long is taken over
    max_chunks_in_flight: int = 16  # chunks one worker feeds its engine at once (bench/balance.py)
    # An idle worker (nothing left to claim) re-executes up to this many of the tail's slowest
    # chunks as backup copies; the first complete output wins (0: never).
    max_backups: int = 2
    # A worker under 0.75x the median rate holds only its share of a full batch and leaves the
    # last sixth of the estimated work to the others (worker/worker.py; false: never).
    straggler_pacing: bool = True
    # Poison records (rundir/isolate.py): a chunk whose holder died with it in its engine's
    # batch this many times is run alone and bisected until the record that kills the engine
    # is found (it dies alone this many times) and becomes an error record.
    max_attempts: int = 2
    # When every worker ended with chunks left and that round got further (a chunk done, an
    # attempt recorded), launch submits again, at most this many times (0: never).
    max_resubmits: int = 12
    heartbeat_s: float = 10.0
    # Seconds before the time limit (or a preemption) Slurm warns a task with SIGUSR2: the
    # worker releases its chunks and the task is requeued (submitit's signal_delay_s; the
    # rendered script's --signal=B:USR2@N). A cluster.time that leaves no work time after a
    # worker's start and this warning is refused before anything is submitted.
    signal_lead_s: int = 90
    # vLLM's compile cache shared by every worker and replica of a model (host/compile_cache.py):
    # a directory on shared storage, or node-local ("/tmp/vllm-compile"); None: vLLM's own per-user
    # default (~/.cache/vllm). Entries are published whole by one rename: never corrupted by
    # concurrent first starts.
    compile_cache: Optional[str] = None
    # Batch through running servers instead of loading a model: a `hpc-infer serve` run
    # directory (its key file is used), or base URL(s) "http://node:port/v1[,http://...]"
    # with the key's file in serve.api_key_file (never a key here).
    endpoint: Optional[str] = None
    endpoint_concurrency: int = (
        128  # requests in flight per replica: enough for the server to batch as the offline engine does
    )


@dataclass
class SamplingConfig:
    name: str = MISSING
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 1024
    min_tokens: int = 0
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None
    # Structured output through vLLM's own guided decoding, one of:
    #   {json: <JSON schema, or a .json file holding one>} | {regex: "..."} | {choice: [a, b]}
    #   | {grammar: "<EBNF>"} | {json_object: true}
    structured: Any = None
    # Any other SamplingParams field (e.g. logit_bias, bad_words, prompt_logprobs), checked
    # against the installed vLLM before submission.
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_vllm(self) -> Dict[str, Any]:
        d = OmegaConf.to_container(OmegaConf.structured(self), resolve=True)
        d.pop("name")
        if d["top_k"] == 0:
            d["top_k"] = -1  # vLLM: -1 disables top-k
        structured, extra = d.pop("structured"), d.pop("extra")
        if structured:
            schema = structured.get("json")
            if isinstance(schema, str) and schema.endswith(".json") and Path(schema).expanduser().is_file():
                structured = dict(structured, json=json.loads(Path(schema).expanduser().read_text()))
            d["structured_outputs"] = structured
        d.update(extra)
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING
    format: str = "auto"  # auto | jsonl | openai_batch | parquet | csv | txt
    id_field: Optional[str] = "id"  # None or absent in the file: ids are derived from line numbers
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    template: Optional[str] = None  # inline template, "{prompt}" and any record field
    template_file: Optional[str] = None
    system_prompt: Optional[str] = None  # prepended to chat messages
    pair_field: Optional[str] = None  # model.task=score: the field holding each record's second text
    limit: Optional[int] = None
    max_line_bytes: int = 16 << 20  # a longer input line is almost surely a broken file
    # Prefix-aware planning (run/plan.py): `auto` groups records whose prompts share their
    # first 1,024 characters into the same chunks, in input order within a group, when the
    # input has such groups scattered (so a worker's prefix cache hits); `off` never does.
    group_prefixes: str = "auto"
    # OpenAI batch files: a field a body leaves out takes vLLM's server default (`server`, as
    # `vllm run-batch` does), or the run's sampling group and seed (`run`, said in the summary).
    batch_defaults: str = "server"
    # Records whose prompt + max_tokens cannot fit max_model_len (found at plan time with the
    # model's tokenizer): error (refused before submission, with lines) | mark (error records,
    # the rest runs) | truncate (plain prompts keep their last tokens; chat records are marked)
    too_long: str = "error"
    # The data set's own grader, used at merge unless merge.postprocess is set (MATH: r1_zero_reward).
    postprocess: Any = None  # (typed Any: OmegaConf cannot assign a dict to an Optional[Dict] None)
    # Record fields to report the hook's metrics by (pass@k, maj@k, categories), e.g.
    # [level, type] for MATH: a field of the record, or of its input row.
    group_by: List[str] = field(default_factory=list)


@dataclass
class MergeConfig:
    format: str = "jsonl"  # jsonl | parquet | openai_batch (the shape `vllm run-batch` writes)
    allow_partial: bool = False
    # Records the engine refused (too long, a value it rejects, ...): keep them as error
    # records in the results (exit 0) | drop them from the results | fail (exit 3). errors.jsonl
    # lists them in every case.
    on_error: str = "keep"
    # A callable applied to each record at merge, e.g. {_target_: hpc_infer.rewards.r1_zero_reward};
    # its returned fields are added to the record and summed in summary.json.
    postprocess: Any = None  # (typed Any: OmegaConf cannot assign a dict to an Optional[Dict] None)
    # Record fields to report the hook's metrics by (pass@k, maj@k, categories), e.g.
    # [level, type] for MATH: a field of the record, or of its input row.
    group_by: List[str] = field(default_factory=list)


ROUTER_POLICIES = ("round_robin", "cache_aware", "power_of_two", "random", "consistent_hash")  # vllm-router's


@dataclass
class ServeConfig:
    """`hpc-infer serve`: N replicas of vLLM's OpenAI server, one per array task."""

    replicas: int = 1
    name: Optional[str] = None  # --served-model-name; default: the model's HF id (else its config name)
    api_key_file: Optional[str] = None  # your own key (a 0600 file); default: generated, ~/.config/hpc_infer/keys/
    idle_minutes: Optional[float] = None  # a replica that served nothing this long stops and frees its GPUs
    port_min: int = 20000  # replicas pick a free port in [port_min, port_max) on their node
    port_max: int = 60000
    host: Optional[str] = None  # default: 127.0.0.1 on local backends, 0.0.0.0 on Slurm (serve/launch.py)
    ready_timeout_min: float = 60.0  # a replica not answering /health by then gives up (and says why)
    # The watchdog: a replica whose server dies (crash, OOM kill) starts it again in place, on
    # the same port, after restart_backoff_s x 2^(restarts so far) (at most 5 min), at most
    # max_restarts times (0: never); the Slurm time limit still ends the replica.
    max_restarts: int = 3
    restart_backoff_s: float = 5.0
    extra_args: List[str] = field(default_factory=list)  # more `vllm serve` flags
    # One URL for all replicas: vllm-router in its own small CPU job (serve/router.py), every
    # route behind the run's key. null: on when replicas > 1 (and when `serve scale` goes above 1).
    router: Optional[bool] = None
    router_policy: str = "round_robin"  # one of vllm-router's: round_robin, cache_aware, power_of_two, ...
    router_port: Optional[int] = None  # default: a free port in [port_min, port_max) on the router's node
    router_cpus: int = 1
    router_mem: Optional[str] = "1G"


@dataclass
class TuneConfig:
    """`hpc-infer tune`: engine settings timed on a sample of the run's own prompts."""

    sample: int = 64  # prompts from data.path (the first ones)
    budget_s: float = 600.0  # stop trying settings after this long (engine starts included)
    repeats: int = 2  # timed runs of the sample per setting: their spread is the noise
    # launch applies the settings `hpc-infer tune` kept for this model and cluster
    # (<output_root>/tuned/<model>__<cluster>.yaml); a setting given in model.engine_kwargs wins
    use: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    cluster: ClusterConfig = MISSING
    sampling: SamplingConfig = MISSING
    data: DataConfig = MISSING
    run_name: Optional[str] = None  # default: <data>__<model>__<sampling>
    output_root: str = "runs"
    seed: Optional[int] = 0  # run seed; each record gets a seed derived from it and its id
    chunks_per_worker: int = 16  # chunk count ~ workers x this (bench/balance.py)
    # Upper bound on a chunk's records: a chunk's output is saved only when it finishes, so
    # a chunk must fit well inside one job's time limit (a requeue redoes it from zero).
    max_chunk_records: int = 2000
    # Who may read the run directory on a shared file system: private (0700/0600, the default),
    # group (0750/0640 + setgid, owned by run_group), or umask (follow your umask).
    permissions: str = "private"
    run_group: Optional[str] = None
    wait: bool = True
    merge: MergeConfig = field(default_factory=MergeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def postprocess(self) -> Optional[Dict[str, Any]]:
        return choose_postprocess(self.merge.postprocess, self.data.postprocess)

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.data.name}__{self.model.name}__{self.sampling.name}"

    @property
    def tuned_path(self) -> Path:
        """Where `hpc-infer tune` keeps the settings it chose for this model and cluster."""
        return Path(self.output_root).expanduser().resolve() / "tuned" / f"{self.model.name}__{self.cluster.name}.yaml"

    @property
    def run_path(self) -> Path:
        return Path(self.output_root).expanduser().resolve() / self.resolved_run_name


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="model_schema", node=ModelConfig)
    cs.store(name="cluster_schema", node=ClusterConfig)
    cs.store(name="sampling_schema", node=SamplingConfig)
    cs.store(name="data_schema", node=DataConfig)
    OmegaConf.register_new_resolver("pkg", lambda rel: str(PACKAGE_DIR / rel), replace=True)
    # GPU clusters give a task the model's TP x PP GPUs, spread over nodes_per_task nodes
    OmegaConf.register_new_resolver(
        "gpus_per_node", lambda tp, pp, nodes: -(-int(tp) * int(pp) // max(1, int(nodes))), replace=True
    )


def unknown_keys(tree: Any, schema: type, path: str = "") -> list[str]:
    """Keys the dataclass schema does not have, however they arrived (`+key=`, a YAML file),
    each with the nearest valid key; free-form fields (Dict/Any) may hold anything."""
    import dataclasses
    import difflib
    import typing

    if not isinstance(tree, dict) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema)
    problems = []
    for key, value in tree.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)
            hint = (
                f"did you mean {(path + '.' if path else '') + near[0]}?"
                if near
                else f"valid keys here: {', '.join(hints)}"
            )
            problems.append(f"{where}: unknown setting; {hint}")
        elif dataclasses.is_dataclass(hints[key]):
            problems += unknown_keys(value, hints[key], where)
    return problems


def wrong_types(tree: Any, schema: type, path: str = "") -> list[str]:
    """Values typed on the command line (strings) that a number or boolean field cannot hold,
    each with the field's default as an example: Hydra would stop with its own words and
    exit 1 ("could not be converted to Integer")."""
    import dataclasses
    import re
    import typing

    if not isinstance(tree, dict) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    words = {int: "a whole number", float: "a number", bool: "true or false"}
    problems = []
    for key, value in tree.items():
        where = f"{path}.{key}" if path else str(key)
        kind = hints.get(key)
        if dataclasses.is_dataclass(kind):
            problems += wrong_types(value, kind, where)
            continue
        optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
        if optional:
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), None)
        if (
            kind not in words
            or not isinstance(value, str)
            or value.startswith(("${", "'", '"'))
            or (optional and value == "null")
        ):
            continue
        ok = (
            re.fullmatch(r"[+-]?\d+", value)
            if kind is int
            else value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")
            if kind is bool
            else re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf|nan", value.lower())
        )
        if not ok:
            example = defaults.get(key)
            example = str(example).lower() if isinstance(example, bool) else example
            problems.append(
                f"{where}={value}: must be {words[kind]}"
                + (f", e.g. {where}={example}" if isinstance(example, (int, float, str)) else "")
            )
    return problems


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Turn Hydra's DictConfig into typed dataclasses, then validate."""
    from .secrets import SECRET_ADVICE, secrets_in

    tree = OmegaConf.to_container(cfg, resolve=False)
    found = secrets_in(tree)
    if found:
        raise UserError(f"{', '.join(found)}: {SECRET_ADVICE} (value not shown)")
    unknown = unknown_keys(tree, RunConfig)
    if unknown:
        raise UserError("invalid configuration:\n  " + "\n  ".join(unknown))
    # What is written is the resolved config: `${oc.env:...}` or any interpolation that pulls a
    # secret in must be caught after resolution, not only as typed
    from .secrets import known_secrets, secrets_in_resolved

    from .secrets import redact

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


def time_to_minutes(spec: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) to whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(spec).strip())
    if not m:
        raise UserError(f"cluster.time={spec}: not a Slurm time; write it as HH:MM:SS or D-HH:MM:SS")
    days, parts = int(m.group(1) or 0), [int(x) for x in m.group(2).split(":")]
    if days:
        h, mi, s = (parts + [0, 0])[:3]
    else:
        h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return max(1, math.ceil(days * 1440 + h * 60 + mi + s / 60))


DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")


def choose_postprocess(merge_spec: Any, data_spec: Any) -> Optional[Dict[str, Any]]:
    """merge.postprocess, else the data set's; `merge.postprocess={}` turns a data set's off."""
    spec = merge_spec if merge_spec is not None else data_spec
    return dict(spec) if spec else None


def hook_needs(spec: Optional[Dict[str, Any]]) -> tuple[tuple[str, ...], str]:
    """(the record fields a merge hook reads, how to name the hook). A hook declares them
    with a `field_args` attribute: the names of its keyword arguments that hold field
    names (r1_zero_reward: answer_field, default "answer")."""
    import inspect

    if not spec:
        return (), ""
    fn = postprocess_fn(spec)
    func = getattr(fn, "func", fn)
    names = []
    for arg in getattr(func, "field_args", ()):
        value = spec.get(arg)
        if value is None:
            param = inspect.signature(func).parameters.get(arg)
            value = param.default if param is not None and param.default is not inspect.Parameter.empty else None
        if value:
            names.append(str(value))
    return tuple(names), f"merge.postprocess {spec['_target_']}"


SHIPPED_HOOKS = ("hpc_infer.rewards.",)  # hooks a merge runs from a run the caller does not own (cli.py)


def _nested_target(value: Any, path: str) -> Optional[str]:
    if isinstance(value, dict):
        if "_target_" in value:
            return path
        return next((p for k, v in value.items() if (p := _nested_target(v, f"{path}.{k}"))), None)
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _nested_target(v, f"{path}[{i}]"))), None)
    return None


def postprocess_fn(spec: Dict[str, Any]):
    """The merge hook as a callable (Hydra's instantiate with _partial_), checked before any job
    runs. Only its own `_target_` is imported: a `_target_` nested in its arguments would be
    instantiated too (and gets past Hydra's own checks), so it is refused."""
    from hydra.utils import instantiate

    target = spec.get("_target_") if isinstance(spec, dict) else None
    if not target:
        raise UserError("merge.postprocess: needs _target_: module.function (e.g. hpc_infer.rewards.r1_zero_reward)")
    nested = next(
        (p for k, v in spec.items() if k != "_target_" and (p := _nested_target(v, f"merge.postprocess.{k}"))), None
    )
    if nested:
        raise UserError(
            f"{nested}: a _target_ inside a merge hook's arguments is not allowed (it would be imported and "
            f"called too); give the hook plain values"
        )
    try:
        return instantiate(dict(spec), _partial_=True, _recursive_=False)
    except Exception as e:  # import errors, unknown arguments
        cause = e.__cause__ or e
        raise UserError(
            f"merge.postprocess._target_={target}: cannot be loaded ({type(cause).__name__}: {cause}); "
            f"check the module path and that its package is installed"
        ) from None


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


CARD_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # what a model card recommends
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
    check(not unknown, "model.sampling_defaults", f"{unknown} are not model-card sampling fields; use "
                                                  f"{', '.join(CARD_SAMPLING)}")
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
        d.format in ("auto", "jsonl", "json", "openai_batch", "parquet", "csv", "txt"),
        "data.format",
        f"'{d.format}' is not one of auto, jsonl, openai_batch, parquet, csv, txt",
    )
    problem = not_a_file(d.path)
    check(problem is None, "data.path", f"{d.path} {problem}; give the prompt file (jsonl, parquet, csv, txt)")
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
