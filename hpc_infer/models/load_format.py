"""`model.load_format` checked before anything is submitted, and sharded-state copies written.

vLLM picks a weight loader by `load_format`; a loader whose package is missing where the
worker runs, or a checkpoint not in the loader's format, fails only after the job has
waited in the queue and the engine has imported. Checked here: the package is importable
by the worker's own interpreter (the host's, or the one inside the cluster's image), and
the checkpoint has what the loader reads: `*.safetensors` for the streaming loaders,
vLLM's per-rank files for `sharded_state`, written for this TP x PP.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

# load_format -> the package its loader imports (vllm/model_executor/model_loader/weight_utils.py)
PACKAGES = {"runai_streamer": "runai_model_streamer", "runai_streamer_sharded": "runai_model_streamer",
            "fastsafetensors": "fastsafetensors", "instanttensor": "instanttensor", "tensorizer": "tensorizer"}
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


def check_load_format(fmt: str | None, model_path: str | Path, tp: int, pp: int, python: str) -> list[str]:
    """Problems, each naming `model.load_format` and the fix; [] when the worker can load it."""
    if not fmt or fmt in ("auto", "hf", "dummy"):
        return []
    problems = []
    path = Path(model_path)
    package = PACKAGES.get(fmt)
    if package and not importable(python, package):
        where = "inside the cluster's image" if " exec " in f" {python} " else f"for {python}"
        extra = {"runai_model_streamer": "vllm[runai]"}.get(package, package)
        problems.append(f"model.load_format={fmt}: the package {package} does not import {where}; install it there "
                        f"(pip install {extra}) or drop model.load_format")
    if not path.is_dir():
        return problems  # a remote URI (s3://) is the loader's to read
    if fmt in SAFETENSORS_ONLY and not any(path.glob("*.safetensors")):
        problems.append(f"model.load_format={fmt}: {path} has no *.safetensors files; this loader reads only "
                        f"safetensors (convert the checkpoint, or use model.load_format=pt)")
    if fmt in ("sharded_state", "runai_streamer_sharded"):
        want = {(p, t) for p in range(pp) for t in range(tp)}
        have = sharded_ranks(path)
        if have != want:
            written = (f"written for TP={1 + max(t for _, t in have)} x PP={1 + max(p for p, _ in have)}" if have
                       else "has no sharded-state files (model-rank-R-part-N.safetensors)")
            problems.append(f"model.load_format={fmt}: {path} {written}, and this run needs TP={tp} x PP={pp}; "
                            f"write a copy for it with `hpc-infer cache shard SOURCE --root DIR --tp {tp} --pp {pp}` "
                            f"(SOURCE: the model's own checkpoint) and point model.path at the directory it prints")
    return problems


def write_sharded_state(model_path: str, out: Path, tp: int, pp: int, dtype: str = "auto",
                        max_size: int = 5 << 30) -> list[Path]:
    """A copy of the model as vLLM's per-rank files for TP x PP (what `sharded_state` loads
    without reading and splitting the whole checkpoint on every start), plus its config
    and tokenizer files. Needs the TP x PP devices it is written for (CPU: processes)."""
    import os
    import shutil

    from vllm import LLM

    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=model_path, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=dtype,
              enforce_eager=True, max_model_len=256)
    pattern = ("model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors" if pp > 1
               else "model-rank-{rank}-part-{part}.safetensors")
    llm.llm_engine.engine_core.save_sharded_state(path=str(out), pattern=pattern, max_size=max_size)
    for entry in os.listdir(model_path):  # config, tokenizer, generation config: all but the weights
        src = Path(model_path) / entry
        if src.suffix in (".bin", ".pt", ".safetensors") or entry.endswith(".safetensors.index.json"):
            continue
        if src.is_dir():
            shutil.copytree(src, out / entry, dirs_exist_ok=True)
        else:
            shutil.copy(src, out / entry)
    return sorted(out.glob("*.safetensors"))
