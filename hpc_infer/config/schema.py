"""The run configuration's schema: typed dataclasses registered in Hydra's ConfigStore, so
an unknown key or a wrong type in `conf/` or on the command line fails inside Hydra with
the key's name."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ..errors import UserError
from .hooks import choose_postprocess

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # hpc_infer/: conf/, data_files/


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
    format: str = "auto"  # auto | jsonl | openai_batch | parquet | csv | txt | arrow
    # A folder of shards or a Hub set (path=hf://datasets/ORG/NAME[@rev]): which split
    # (test, train, ...) and which subset (the Hub's "config", e.g. GSM8K's main). Unset: the only one.
    split: Optional[str] = None
    subset: Optional[str] = None
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
    budget_s: float = 600.0  # engine starts included; a setting still running then is stopped (not the defaults)
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
    chunks_per_worker: int = 64  # the smallest chunk is total / (2 x workers x this): docs/decisions.md
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


DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
CARD_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # what a model card recommends


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
