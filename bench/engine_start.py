"""A worker's engine start on the CPU default, in phases, side by side with the floor.

    .venv/bin/python bench/engine_start.py [--reps 2]

Each measurement is a fresh process (what every array task pays). Phases of our start:
interpreter, `import torch`, `import vllm`, our worker modules, config + tokenizer,
then vLLM's `LLM(...)` split by its own log lines into weight read and profiling / KV
cache / warm-up, and the first token of one greedy request. The floor is a bare
`import vllm` plus one read of the weight files. The first repetition runs with cold
caches as far as this machine lets us (weights not read since the last repetition's
`posix_fadvise(DONTNEED)`); later ones are warm (page cache, .pyc files).
Prints the ratios; measurement only, nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import json, os, sys, time
t = {"start": float(sys.argv[1])}
t["interpreter"] = time.time()
import torch
t["torch"] = time.time()
import vllm
t["vllm"] = time.time()
from hpc_infer.worker import loop, engine, rundir, claims  # our worker's own modules
t["ours"] = time.time()
path = sys.argv[2]
from transformers import AutoConfig, AutoTokenizer
AutoConfig.from_pretrained(path); tok = AutoTokenizer.from_pretrained(path)
t["config_tokenizer"] = time.time()
from vllm import LLM, SamplingParams
llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=2048, enable_chunked_prefill=False,
          max_num_batched_tokens=2048)
t["llm"] = time.time()
llm.generate(["The capital of France is"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
t["first_token"] = time.time()
print("TIMES " + json.dumps(t), flush=True)
'''

FLOOR = r'''
import sys, time, glob, os
t0 = float(sys.argv[1])
import vllm
t1 = time.time()
n = 0
for f in glob.glob(os.path.join(sys.argv[2], "*.safetensors")):
    with open(f, "rb") as fh:
        while chunk := fh.read(64 << 20):
            n += len(chunk)
t2 = time.time()
print(f"FLOOR {t1 - t0} {t2 - t1} {n}", flush=True)
'''

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def drop_cache(model: Path) -> None:
    """Ask the kernel to forget the weight files' pages (no root needed for our own files)."""
    for f in model.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(code: str, model: Path) -> tuple[str, str]:
    env = dict(os.environ, **ENV)
    p = subprocess.run([sys.executable, "-c", code, repr(time.time()), str(model)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return p.stdout, p.stderr


def vllm_phases(log: str) -> dict[str, float]:
    """vLLM's own phase times from its log (weights; profile + KV cache + warm-up)."""
    import re

    out = {}
    m = re.search(r"Loading weights took ([\d.]+) seconds", log) or re.search(r"Model loading took [\d.]+ \w+ and ([\d.]+) seconds", log)
    if m:
        out["weights"] = float(m.group(1))
    m = re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", log)
    if m:
        out["profile_kv_warmup"] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from hpc_infer.models.cpu_model import ensure_smollm2

    model = Path(ensure_smollm2())
    rows = []
    for rep in range(args.reps):
        kind = "cold" if rep == 0 else "warm"
        if rep == 0:
            drop_cache(model)
        out, err = run(CHILD, model)
        t = json.loads(out.split("TIMES ", 1)[1].splitlines()[0])
        phases = {"interpreter": t["interpreter"] - t["start"], "import torch": t["torch"] - t["interpreter"],
                  "import vllm": t["vllm"] - t["torch"], "import ours": t["ours"] - t["vllm"],
                  "config+tokenizer": t["config_tokenizer"] - t["ours"], "LLM(...)": t["llm"] - t["config_tokenizer"],
                  "first token": t["first_token"] - t["llm"]}
        total = t["first_token"] - t["start"]
        if rep == 0:
            drop_cache(model)
        fout, _ = run(FLOOR, model)
        imp, read, nbytes = fout.split("FLOOR ", 1)[1].split()[:3]
        floor = float(imp) + float(read)
        rows.append((kind, phases, vllm_phases(err), total, floor, float(imp), float(read)))
    for kind, phases, vp, total, floor, imp, read in rows:
        print(f"[{kind}] our worker's start to first token: {total:.1f} s")
        for k, v in phases.items():
            print(f"    {k:18} {v:6.2f} s")
        if vp:
            print("    of LLM(...), vLLM's own log: " + ", ".join(f"{k} {v:.2f} s" for k, v in vp.items()))
        print(f"  floor (bare `import vllm` {imp:.2f} s + one read of the weights {read:.2f} s): {floor:.2f} s")
        print(f"  ratio start/floor = {total / floor:.2f}")


if __name__ == "__main__":
    main()
