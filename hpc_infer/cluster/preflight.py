"""GPU pre-flight: the parallel layout, the model and the allocation checked against each
other on the login node, before a job waits hours in the queue to die in its first minute.

Reads the resolved model's `config.json` (and the safetensors index's total size when
there is one) and the cluster config. Each refusal names both sides and the fix. What
vLLM itself checks at start (heads divisible by TP, KV heads, layers, positions,
quantization) is checked here the same way; the memory estimate is deliberately rough
(weights + the KV cache of one full-length sequence + a fixed overhead) and only
refuses what cannot fit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..config import ClusterConfig, ModelConfig
from ..errors import UserError

# GPU memory (GiB) and bf16 support by type name, for `cluster.gpu_type`.
GPU_TYPES: dict[str, tuple[float, bool]] = {
    "V100": (32, False),
    "V100-16": (16, False),
    "T4": (16, False),
    "P100": (16, False),
    "A10": (24, True),
    "A10G": (24, True),
    "L4": (24, True),
    "A30": (24, True),
    "A40": (48, True),
    "L40": (48, True),
    "L40S": (48, True),
    "RTX6000ADA": (48, True),
    "A100-40": (40, True),
    "A100": (80, True),
    "A100-80": (80, True),
    "H100": (80, True),
    "H100-94": (94, True),
    "H200": (141, True),
    "GH200": (96, True),
    "B200": (180, True),
    "MI250X": (64, True),
    "MI300X": (192, True),
}
BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "int8": 1}
ON_THE_FLY_QUANT = {"fp8", "bitsandbytes", "experts_int8", "torchao"}  # need no quantization_config
OVERHEAD_GIB = 1.5  # CUDA context, activations, sampler; rough


def gpus_per_node(cluster: ClusterConfig) -> int:
    """GPUs one task gets per node: the count in `gres` (gpu:4, gpu:a100:4), else gpus_per_task."""
    for item in (cluster.gres or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return cluster.gpus_per_task


def read_model_config(path: str | Path) -> Optional[dict]:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable JSON model config ({e}); the model directory looks broken") from None


def _text(cfg: dict) -> dict:
    """Multimodal configs keep the language model's numbers under text_config."""
    return cfg.get("text_config") or cfg.get("llm_config") or cfg


def max_positions(cfg: dict) -> Optional[int]:
    """The model's longest sequence, as vLLM derives it (smallest of the length keys, times a
    linear/yarn rope scaling factor)."""
    t = _text(cfg)
    keys = (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "seq_length",
        "max_sequence_length",
        "max_seq_length",
        "seq_len",
    )
    found = [int(t[k]) for k in keys if isinstance(t.get(k), (int, float)) and t[k] > 0]
    if not found:
        return None
    n = min(found)
    rope = t.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type")
    if kind in ("linear", "yarn", "dynamic") and rope.get("factor") and kind != "dynamic":
        n = int(n * float(rope["factor"]))
    return n


def weight_bytes(path: str | Path, cfg: dict, dtype_bytes: int) -> Optional[float]:
    """Weight bytes at the run's dtype: from the safetensors index (exact), else from the config."""
    t = _text(cfg)
    index = Path(path) / "model.safetensors.index.json"
    src_bytes = BYTES.get(str(t.get("torch_dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2)
    try:
        total = json.loads(index.read_text())["metadata"]["total_size"]
        return float(total) / src_bytes * dtype_bytes
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h, layers, vocab = t.get("hidden_size"), t.get("num_hidden_layers"), t.get("vocab_size")
    if not (h and layers and vocab):
        return None
    inter = t.get("intermediate_size") or t.get("ffn_dim") or 4 * h
    heads = t.get("num_attention_heads") or 1
    kv = t.get("num_key_value_heads") or heads
    head_dim = t.get("head_dim") or h // heads
    attn = h * head_dim * (heads + 2 * kv) + heads * head_dim * h
    mlp = (3 if t.get("hidden_act", "silu") in ("silu", "swiglu") or "intermediate_size" in t else 2) * h * inter
    experts = t.get("num_local_experts") or t.get("num_experts") or 1
    embed = vocab * h * (1 if t.get("tie_word_embeddings", cfg.get("tie_word_embeddings")) else 2)
    return float(layers * (attn + mlp * experts) + embed) * dtype_bytes


def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> Optional[float]:
    t = _text(cfg)
    h, layers, heads = t.get("hidden_size"), t.get("num_hidden_layers"), t.get("num_attention_heads")
    if not (h and layers and heads):
        return None
    kv = t.get("num_key_value_heads") or heads
    head_dim = t.get("head_dim") or h // heads
    return 2.0 * layers * kv * head_dim * dtype_bytes


def _dtype(model: ModelConfig, cfg: dict) -> str:
    if model.dtype not in ("auto", None):
        return {"half": "float16", "float": "float32"}.get(model.dtype, model.dtype)
    src = str(_text(cfg).get("torch_dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return "float16" if src == "float32" else src  # vLLM's auto serves fp32 checkpoints in fp16 on GPUs


def preflight(
    model: ModelConfig, cluster: ClusterConfig, model_path: str | Path, host_mem_gib: float | None = None
) -> list[str]:
    """Everything that would make vLLM refuse this model on this allocation, raised as one
    UserError (launch, sbatch and serve call this before planning). Returns notes on what
    could not be checked (printed, not fatal). `host_mem_gib`: this machine's memory, for
    CPU workers on the local backends (default: read from /proc/meminfo)."""
    if cluster.compile_cache and "$" not in cluster.compile_cache:  # bound into images: it must exist
        try:
            os.makedirs(os.path.expanduser(cluster.compile_cache), exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cluster.compile_cache: cannot create {cluster.compile_cache}: {e.strerror}; give a "
                f"directory you can write (shared storage, or node-local like /tmp/vllm-compile)"
            )
    if cluster.container.image:
        from .container import check_paths, container_binds

        missing = check_paths(cluster.container, container_binds(cluster, model, None, str(model_path)), cluster.env)
        if missing:
            raise UserError(
                "container pre-flight: inside the image the worker would not find what it needs:\n  "
                + "\n  ".join(missing)
                + "\nNothing was planned or submitted."
            )
    problems: list[str] = []
    notes: list[str] = []
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    per_node = gpus_per_node(cluster)
    uses_gpus = cluster.backend == "slurm" and (per_node > 0 or cluster.gres)
    if uses_gpus:
        nodes = cluster.nodes_per_task
        gpus = per_node * nodes
        if tp * pp != gpus:
            gres = f"gres {cluster.gres}" if cluster.gres else f"gpus_per_task {cluster.gpus_per_task}"
            fix_nodes = tp * pp // nodes if (tp * pp) % nodes == 0 else None
            fixes = []
            if fix_nodes:
                key = f"cluster.gres=gpu:{fix_nodes}" if cluster.gres else f"cluster.gpus_per_task={fix_nodes}"
                fixes.append(key + (f" (× nodes_per_task {nodes})" if nodes > 1 else ""))
            if gpus % pp == 0:
                fixes.append(f"model.tensor_parallel_size={gpus // pp}")
            problems.append(
                f"model.tensor_parallel_size={tp} × pipeline_parallel_size={pp} needs {tp * pp} GPU{'s' * (tp * pp != 1)} per task; "
                f"cluster {cluster.name} gives {per_node} ({gres}) × nodes_per_task {nodes} = {gpus}: "
                f"set {' or '.join(fixes) or 'the two to agree'}"
            )
    if model.load_format:  # the loader's package where the worker runs, a checkpoint that suits it
        from ..models.load_format import check_load_format
        from .container import container_binds, python_command
        from .submit import host_python

        binds = container_binds(cluster, model, None, str(model_path)) if cluster.container.image else []
        python = python_command(cluster.container, binds, gpus=False, host_python=host_python())
        problems += check_load_format(model.load_format, model_path, tp, pp, python, model.dtype)
    cfg = read_model_config(model_path)
    if cfg is None:
        notes.append(f"no config.json in {model_path}: heads, layers, positions and memory not checked")
        return _finish(problems, notes)
    t = _text(cfg)
    heads, kv = t.get("num_attention_heads"), t.get("num_key_value_heads") or t.get("num_attention_heads")
    if heads and heads % tp:
        ok = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 16]
        problems.append(
            f"model.tensor_parallel_size={tp} does not divide the model's {heads} attention heads "
            f"({model_path}/config.json): use one of {ok}"
        )
    if kv and tp > 1 and (tp % kv if tp >= kv else kv % tp):
        problems.append(
            f"model.tensor_parallel_size={tp} and the model's {kv} KV heads: one must divide the other "
            f"({model_path}/config.json)"
        )
    layers = t.get("num_hidden_layers")
    if layers and pp > layers:
        problems.append(f"model.pipeline_parallel_size={pp} exceeds the model's {layers} layers")
    longest = max_positions(cfg)
    allow_long = str(cluster.env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "")) in ("1", "true", "True")
    if model.max_model_len and longest and model.max_model_len > longest and not allow_long:
        problems.append(
            f"model.max_model_len={model.max_model_len} exceeds the model's maximum of {longest} positions "
            f"({model_path}/config.json): set model.max_model_len={longest} or less (or force it with "
            f"cluster.env.VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, at your own risk)"
        )
    dtype = _dtype(model, cfg)
    if model.dtype not in (None, "auto") and model.dtype not in BYTES:
        problems.append(f"model.dtype={model.dtype}: not a dtype vLLM serves (bfloat16, float16, float32)")
    gpu_mem, bf16 = gpu_memory(cluster)
    if uses_gpus and dtype == "bfloat16" and bf16 is False:
        problems.append(
            f"model.dtype resolves to bfloat16, which cluster.gpu_type={cluster.gpu_type} does not support: "
            f"set model.dtype=float16"
        )
    qcfg = cfg.get("quantization_config") or t.get("quantization_config")
    have = (qcfg or {}).get("quant_method")
    if (
        model.quantization
        and have
        and model.quantization != have
        and not (model.quantization.endswith("_marlin") and model.quantization.startswith(have))
    ):
        problems.append(
            f"model.quantization={model.quantization} but the checkpoint is quantized with {have} "
            f"({model_path}/config.json quantization_config): set model.quantization={have} or null"
        )
    if model.quantization and not have and model.quantization not in ON_THE_FLY_QUANT:
        problems.append(
            f"model.quantization={model.quantization} but the checkpoint has no quantization_config: "
            f"point the model at a {model.quantization} checkpoint, or use one of "
            f"{', '.join(sorted(ON_THE_FLY_QUANT))} (quantized at load), or null"
        )
    if uses_gpus:
        if gpu_mem is None:
            notes.append("GPU memory not checked: set cluster.gpu_type (e.g. A100) or cluster.gpu_mem_gb")
        else:
            problems += _memory(model, cluster, model_path, cfg, dtype, gpu_mem, have)
    elif cluster.gpus_per_task == 0 and not cluster.gres:
        problems += _cpu_memory(model, cluster, model_path, cfg, dtype, have, host_mem_gib)
    return _finish(problems, notes)


CPU_OVERHEAD_GIB = 1.0  # a CPU worker's interpreter, torch and vLLM beside the weights and the KV cache


def _cpu_memory(
    model: ModelConfig,
    cluster: ClusterConfig,
    path,
    cfg: dict,
    dtype: str,
    quant: Optional[str],
    host_mem_gib: float | None,
) -> list[str]:
    """CPU workers (vLLM's CPU build): the weights and the KV cache space (VLLM_CPU_KVCACHE_SPACE
    GiB, vLLM's default 4) must fit in a Slurm task's cluster.mem, or, on the local backends,
    in this machine's memory shared by cluster.workers processes. A 70B model on a laptop is
    refused here, not after minutes of loading."""
    if quant:
        return []  # packed formats: their size is the files' size; not estimated here
    wbytes = weight_bytes(path, cfg, BYTES.get(dtype, 2))
    if wbytes is None:
        return []
    gib = 2**30
    try:
        kv = float(cluster.env.get("VLLM_CPU_KVCACHE_SPACE") or 4)
    except ValueError:
        kv = 4.0
    need = wbytes / gib + kv + CPU_OVERHEAD_GIB
    what = (
        f"model {model.name} needs about {need:.1f} GiB per CPU worker ({wbytes / gib:.1f} GiB of {dtype} "
        f"weights, {kv:g} GiB of KV cache space (VLLM_CPU_KVCACHE_SPACE), {CPU_OVERHEAD_GIB} GiB for Python, "
        f"torch and vLLM)"
    )
    if cluster.backend == "slurm":
        have = mem_gib(cluster.mem) if cluster.mem else None
        if have is None or need <= have:
            return []
        return [
            f"{what}; cluster {cluster.name} gives a task cluster.mem={cluster.mem}: set cluster.mem="
            f"{int(need) + 1}G or more, a smaller model, or a GPU cluster"
        ]
    host = host_mem_gib if host_mem_gib is not None else _host_mem_gib()
    workers = 1 if cluster.backend == "debug" else max(1, cluster.workers)
    if host is None or need * workers <= host:
        return []
    fewer = int(host // need)
    return [
        f"{what}; this machine has {host:.0f} GiB for {workers} worker{'s' * (workers != 1)}: "
        + (f"set cluster.workers={fewer}, " if 0 < fewer < workers else "")
        + "use a smaller model, or a GPU cluster"
    ]


def _host_mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_gib(spec: str) -> float | None:
    """A Slurm memory size ('40G', '512M', '4096' = MiB) in GiB."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", str(spec).strip(), re.I)
    if not m:
        return None
    scale = {"K": 2**-20, "M": 2**-10, "": 2**-10, "G": 1, "T": 2**10}[m.group(2).upper()]
    return float(m.group(1)) * scale


def gpu_memory(cluster: ClusterConfig) -> tuple[Optional[float], Optional[bool]]:
    if cluster.gpu_type:
        key = cluster.gpu_type.upper().replace(" ", "")
        if key not in GPU_TYPES:
            raise UserError(
                f"cluster.gpu_type={cluster.gpu_type}: unknown; use one of {', '.join(GPU_TYPES)} or set "
                f"cluster.gpu_mem_gb"
            )
        mem, bf16 = GPU_TYPES[key]
        return (cluster.gpu_mem_gb or mem), bf16
    return cluster.gpu_mem_gb, None


def _memory(
    model: ModelConfig, cluster: ClusterConfig, path, cfg: dict, dtype: str, gpu_mem: float, quant: Optional[str]
) -> list[str]:
    if quant and quant not in ("fp8",):
        return []  # 4-bit and other packed formats: their size is the files' size; not estimated here
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    width = BYTES.get(dtype, 2)
    wbytes = weight_bytes(path, cfg, 1 if (quant or model.quantization) in ("fp8",) else width)
    per_tok = kv_bytes_per_token(cfg, width)
    if wbytes is None or per_tok is None:
        return []
    seq = model.max_model_len or max_positions(cfg) or 4096
    gib = 2**30

    def need_gib(gpus: int) -> float:  # weights and one full-length sequence's KV cache, split over the GPUs
        return (wbytes + per_tok * seq) / gpus / gib + OVERHEAD_GIB

    need = need_gib(tp * pp)
    util = model.gpu_memory_utilization or 0.9
    have = gpu_mem * util
    if need <= have:
        return []
    gpus_needed = tp * pp
    while gpus_needed < 64 and need_gib(gpus_needed) > have:
        gpus_needed *= 2
    return [
        f"model {model.name} needs about {need:.0f} GiB per GPU ({wbytes / gib:.0f} GiB of {dtype} weights and "
        f"{per_tok * seq / gib:.1f} GiB of KV cache for one {seq}-token sequence, over TP {tp} × PP {pp}, plus "
        f"{OVERHEAD_GIB} GiB); cluster {cluster.name} gives {gpu_mem:g} GiB × gpu_memory_utilization {util} = "
        f"{have:.0f} GiB: use more GPUs (model.tensor_parallel_size={gpus_needed} with as many GPUs per task), "
        f"a smaller model.max_model_len, or a quantized checkpoint"
    ]


def _finish(problems: list[str], notes: list[str]) -> list[str]:
    if problems:
        raise UserError("pre-flight: this job would fail on the cluster:\n  " + "\n  ".join(problems))
    return notes


def cpu_build_on_gpus(cluster: ClusterConfig) -> str | None:
    """A GPU cluster's workers would run this environment's python (no container image),
    and this environment has vLLM's CPU build: the job would start, find no usable vLLM
    for its GPUs, or run on the CPU for hours. Say so before anything is submitted."""
    from ..worker.vllm_engine import cpu_build

    if cluster.gpus_per_task <= 0 or cluster.container.image or not cpu_build():
        return None
    return (
        f"cluster={cluster.name} gives each task {cluster.gpus_per_task} GPU(s), but the workers would run this "
        f"environment's python ({sys.executable}), whose vLLM is the CPU build (vllm-cpu). Install the GPU build "
        f"on shared storage (`HPC_INFER_VENV=/shared/venvs/hpc_infer bash scripts/setup.sh --gpu`) and launch "
        f"from it, or run the workers in the cluster's vLLM image (cluster.container.image=/path/vllm.sif); "
        f"see README, 'Installing on a GPU cluster'"
    )


START_GUESS_S = 120  # a worker's start (image, imports, weights) when no earlier start of the run was measured


def time_limit_problem(cluster: ClusterConfig, measured_start_s: float | None = None) -> tuple[str | None, str | None]:
    """(refusal, warning) for a Slurm cluster.time that leaves a worker no time to work: the
    scheduler warns `signal_lead_s` before the limit and the worker then stops, so a task
    shorter than its start plus that warning does nothing but requeue (three times, then fail
    with 0 records). The start is the run's own measured one when it has run before."""
    from ..config import time_to_minutes

    if cluster.backend != "slurm":
        return None, None
    limit_s = time_to_minutes(cluster.time) * 60
    start = measured_start_s if measured_start_s is not None else START_GUESS_S
    need = cluster.signal_lead_s + start
    whole = -(-int(need + 60) // 60)  # minutes, rounded up: the start, the warning and a minute of work
    minimum = f"{whole // 60:02d}:{whole % 60:02d}:00"
    where = (
        f"cluster.time={cluster.time} ({limit_s:.0f} s) against a worker's start "
        f"({'measured in this run: ' if measured_start_s is not None else 'assumed: '}{start:.0f} s) and the "
        f"scheduler's warning {cluster.signal_lead_s} s before the limit (cluster.signal_lead_s)"
    )
    if limit_s <= need:
        return (
            f"{where}: no time is left to generate; every task would only requeue. Give at least cluster.time={minimum}"
        ), None
    if limit_s < 2 * need:
        return None, f"{where}: less than half of each task generates; consider cluster.time={minimum} or more"
    return None, None


def check_time_limit(cluster: ClusterConfig, run_path: Path) -> None:
    """Refuse (or warn about) a cluster.time that leaves a worker no time after its start and
    the scheduler's warning, before anything is planned; an earlier launch's measured
    engine start counts when the run has one."""
    from ..log import say
    from ..rundir import RunDir, read_heartbeats

    local = node_local_problem(cluster, Path(run_path))
    if local:
        raise UserError(local)
    run = RunDir(Path(run_path))
    try:  # an earlier launch's engine starts; a folder the rule refuses is named by the run's own door
        starts = (
            [float(b["engine_start_s"]) for b in read_heartbeats(run) if b.get("engine_start_s")]
            if run.heartbeats.is_dir()
            else []
        )
    except UserError:
        starts = []
    refusal, warning = time_limit_problem(cluster, max(starts) if starts else None)
    if refusal:
        raise UserError(refusal)
    if warning:
        say(f"warning: {warning}")


LOCAL_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs"}


def filesystem_type(path: Path) -> str | None:
    """The type of the file system `path` (or its nearest existing parent) lives on, from
    /proc/self/mountinfo (the longest mount point that contains it)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    real, best, kind = os.path.realpath(path), "", None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" - ")
        mount = fields[0].split()[4].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[1].split()[0] if len(fields) > 1 else None
    return kind


def node_local_problem(cluster: ClusterConfig, run_path: Path) -> str | None:
    """A Slurm run whose directory is on a node's own disk (/tmp, a local ext4/xfs, tmpfs)
    while its nodes are other machines: every worker would see another, empty folder."""
    import socket
    import subprocess

    if cluster.backend != "slurm":
        return None
    kind = filesystem_type(run_path)
    if kind not in LOCAL_FS:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "nodes", "--oneliner"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = {w.split("=", 1)[1] for w in out.split() if w.startswith("NodeHostName=")}
    me = {socket.gethostname(), socket.getfqdn(), "localhost"}
    if not hosts or hosts <= me:
        return None  # every node is this machine (a one-machine Slurm): its disk is theirs
    return (
        f"output_root: {run_path} is on this machine's own {kind} file system, and cluster={cluster.name}'s "
        f"nodes ({', '.join(sorted(hosts)[:3])}{' ...' if len(hosts) > 3 else ''}) are other machines: each "
        f"worker would see a folder of its own. Put runs on storage every node mounts (output_root=$SCRATCH/runs "
        f"or your home)"
    )
