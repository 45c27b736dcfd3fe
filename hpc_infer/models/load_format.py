"""`model.load_format` checked before anything is submitted, and sharded-state copies written.

vLLM picks a weight loader by `load_format`; a loader whose package is missing where the
worker runs, or a checkpoint not in the loader's format, fails only after the job has
waited in the queue and the engine has imported. Checked here: the package is importable
by the worker's own interpreter (the host's, or the one inside the cluster's image), and
the checkpoint has what the loader reads: `*.safetensors` for the streaming loaders,
vLLM's per-rank files for `sharded_state`, written for this TP x PP.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
import subprocess
from pathlib import Path

# load_format -> the package its loader imports (vllm/model_executor/model_loader/weight_utils.py)
PACKAGES = {
    "runai_streamer": "runai_model_streamer",
    "runai_streamer_sharded": "runai_model_streamer",
    "fastsafetensors": "fastsafetensors",
    "instanttensor": "instanttensor",
    "tensorizer": "tensorizer",
}
SAFETENSORS_ONLY = {"safetensors", "runai_streamer", "fastsafetensors", "instanttensor"}
# vLLM's ShardedStateLoader file names: TP_ONLY_PATTERN, and PP_AND_TP_PATTERN when PP > 1
_TP_ONLY = re.compile(r"model-rank-(\d+)-part-\d+\.safetensors$")
_PP_AND_TP = re.compile(r"model-pp-(\d+)-tp-(\d+)-part-\d+\.safetensors$")


def sharded_ranks(path: Path) -> set[tuple[int, int]]:
    """(pp_rank, tp_rank) of every sharded-state file in a checkpoint directory."""
    ranks = set()
    for f in path.glob("*.safetensors"):
        if m := _TP_ONLY.match(f.name):
            ranks.add((0, int(m.group(1))))
        elif m := _PP_AND_TP.match(f.name):
            ranks.add((int(m.group(1)), int(m.group(2))))
    return ranks


def importable(python: str, package: str) -> bool:
    """Whether `package` imports in the worker's interpreter (a shell command: the host's
    python, or `apptainer exec ... IMAGE python3`)."""
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({package!r}) else 1)"
    p = subprocess.run(shlex.split(python) + ["-c", code], capture_output=True, timeout=600)
    return p.returncode == 0


# safetensors' dtype names -> torch's
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_ALIASES = {"half": "float16", "float": "float32"}
META = ".hpc_infer.json"  # models/cache_admin.py writes it into every copy it publishes


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensor_stats(files: list[Path]) -> tuple[int, dict[str, int]]:
    """(number of elements, elements per dtype) of every tensor in these safetensors files."""
    total, by_dtype = 0, {}
    for f in files:
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
            dt = _ST_DTYPES.get(t["dtype"], t["dtype"].lower())
            by_dtype[dt] = by_dtype.get(dt, 0) + n
    return total, by_dtype


def copy_dtype(path: Path) -> str | None:
    """The dtype a sharded copy's weights were written in: as `cache shard` recorded it, else
    the dtype holding most of its elements."""
    try:
        meta = json.loads((path / META).read_text())
        if meta.get("dtype"):
            return str(meta["dtype"])
    except (OSError, ValueError):
        pass
    try:
        _, by_dtype = tensor_stats(sorted(path.glob("*.safetensors")))
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return None  # not safetensors we can read: the loader names that itself
    return max(by_dtype, key=by_dtype.get) if by_dtype else None


def run_dtype(dtype: str | None, model_path: Path) -> str | None:
    """The dtype a run loads weights in, where it does not depend on the machine: an explicit
    model.dtype, or `auto` on a checkpoint saved in 16 bits (vLLM keeps that). `auto` on a
    float32 checkpoint is the platform's choice: None (not compared)."""
    if dtype and dtype != "auto":
        return _ALIASES.get(dtype, dtype)
    try:
        cfg = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    src = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
    return src if src in ("bfloat16", "float16") else None


def check_load_format(
    fmt: str | None, model_path: str | Path, tp: int, pp: int, python: str, dtype: str | None = None
) -> list[str]:
    """Problems, each naming `model.load_format` and the fix; [] when the worker can load it.
    `dtype`: the run's model.dtype, compared with the dtype a sharded copy was written in."""
    if not fmt or fmt in ("auto", "hf", "dummy"):
        return []
    problems = []
    path = Path(model_path)
    package = PACKAGES.get(fmt)
    if package and not importable(python, package):
        where = "inside the cluster's image" if " exec " in f" {python} " else f"for {python}"
        extra = {"runai_model_streamer": "vllm[runai]"}.get(package, package)
        problems.append(
            f"model.load_format={fmt}: the package {package} does not import {where}; install it there "
            f"(pip install {extra}) or drop model.load_format"
        )
    if not path.is_dir():
        return problems  # a remote URI (s3://) is the loader's to read
    if fmt in SAFETENSORS_ONLY and not any(path.glob("*.safetensors")):
        problems.append(
            f"model.load_format={fmt}: {path} has no *.safetensors files; this loader reads only "
            f"safetensors (convert the checkpoint, or use model.load_format=pt)"
        )
    if fmt in ("sharded_state", "runai_streamer_sharded"):
        want = {(p, t) for p in range(pp) for t in range(tp)}
        have = sharded_ranks(path)
        if have != want:
            written = (
                f"written for TP={1 + max(t for _, t in have)} x PP={1 + max(p for p, _ in have)}"
                if have
                else "has no sharded-state files (model-rank-R-part-N.safetensors)"
            )
            problems.append(
                f"model.load_format={fmt}: {path} {written}, and this run needs TP={tp} x PP={pp}; "
                f"write a copy for it with `hpc-infer cache shard SOURCE --root DIR --tp {tp} --pp {pp}` "
                f"(SOURCE: the model's own checkpoint) and point model.path at the directory it prints"
            )
        want_dtype, have_dtype = run_dtype(dtype, path), copy_dtype(path) if have else None
        if want_dtype and have_dtype and want_dtype != have_dtype:
            problems.append(
                f"model.load_format={fmt}: {path} was written in {have_dtype} and this run loads "
                f"{want_dtype} (model.dtype={dtype or 'auto'}): set model.dtype={have_dtype}, or write a "
                f"copy in {want_dtype} with `hpc-infer cache shard SOURCE --root DIR --tp {tp}"
                + (f" --pp {pp}" if pp > 1 else "")
                + f" --dtype {want_dtype}`"
            )
    return problems


def incomplete_copy(copy: Path, source: Path) -> str | None:
    """Why a sharded copy cannot stand in for its source, or None. Every rank together must
    hold at least the source's elements (rank files repeat what is replicated, never hold
    less): a copy that lost weights (vLLM's CPU build drops linear weights it hands to
    oneDNN) fails at load time with "Missing keys" otherwise."""
    src_files = sorted(source.glob("*.safetensors"))
    if not src_files:
        return None  # a .bin checkpoint: nothing cheap to compare with
    want, _ = tensor_stats(src_files)
    have, _ = tensor_stats(sorted(copy.glob("*.safetensors")))
    if have < want:
        return (
            f"the sharded copy holds {have:,} weight elements and {source} holds {want:,}: vLLM wrote it "
            f"without some of the model's weights"
        )
    return None


def write_sharded_state(
    model_path: str, out: Path, tp: int, pp: int, dtype: str = "auto", max_size: int = 5 << 30
) -> str:
    """A copy of the model as vLLM's per-rank files for TP x PP (what `sharded_state` loads
    without reading and splitting the whole checkpoint on every start), plus its config
    and tokenizer files. Needs the TP x PP devices it is written for (CPU: processes).
    Returns the dtype the weights were written in (what `auto` became)."""
    import os
    import shutil

    from vllm import LLM

    out.mkdir(parents=True, exist_ok=True)
    if _cpu_build() and tp * pp == 1:
        _keep_cpu_linear_weights()
    llm = LLM(
        model=model_path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=256,
    )
    written = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    pattern = (
        "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"
        if pp > 1
        else "model-rank-{rank}-part-{part}.safetensors"
    )
    llm.llm_engine.engine_core.save_sharded_state(path=str(out), pattern=pattern, max_size=max_size)
    for entry in os.listdir(model_path):  # config, tokenizer, generation config: all but the weights
        src = Path(model_path) / entry
        if src.suffix in (".bin", ".pt", ".safetensors") or entry.endswith(".safetensors.index.json"):
            continue
        if src.is_dir():
            shutil.copytree(src, out / entry, dirs_exist_ok=True)
        else:
            shutil.copy(src, out / entry)
    return written


def _cpu_build() -> bool:
    from ..worker.vllm_engine import cpu_build

    return cpu_build()


def _keep_cpu_linear_weights() -> None:
    """vLLM's CPU build hands each linear layer's weight to a packed kernel after loading
    (oneDNN, or sgl on AMX) and drops the layer's own copy (`remove_weight=True`), so its
    `save_sharded_state` writes no linear weights at all whenever the kernel takes the dtype
    (float32 on AVX2; bfloat16 too on AVX-512): the copy then fails every load with "Missing
    keys". Writing a copy, the engine keeps them: it runs in this process (so the change
    reaches it) and the dispatch is told not to drop the weight. Only `cache shard` does
    this; runs are untouched."""
    import os

    import vllm.model_executor.layers.utils as layer_utils

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "_hpc_infer_keeps_weights", False):
        return

    def keep_weights(layer, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    keep_weights._hpc_infer_keeps_weights = True
    layer_utils.dispatch_cpu_unquantized_gemm = keep_weights
