"""The CPU default's dtype, measured: bfloat16 (the checkpoint's) vs. float32, side by side.

    .venv/bin/python bench/cpu_dtype.py

One fresh process per dtype (SmolLM2-135M-Instruct on vLLM's CPU build, the settings of
`cluster=local`): 72 MATH-sized prompts x 8 tokens greedy (prefill heavy), then 8 prompts
x 64 tokens (decode heavy). Without AVX-512 BF16, vLLM's CPU build
logs "Failed to create oneDNN linear, fallback to torch linear" for bf16, which is why
`model=smollm2_cpu` runs in float32. Prints the times and the ratios; nothing asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys, time
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype=sys.argv[2], enforce_eager=True, max_model_len=2048, enable_chunked_prefill=False,
          max_num_batched_tokens=2048)
prompts = [f"Compute {i * 7} + {i * 13}. Show the carrying step by step, then check the sum by subtracting. " * 3
           for i in range(72)]
cases = {"72 prompts x 8 tokens, greedy": (prompts, [SamplingParams(max_tokens=8, temperature=0)] * 72),
         "8 prompts x 64 tokens, greedy": (prompts[:8], [SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)] * 8)}
llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
out = {}
for name, (ps, sp) in cases.items():
    t = time.perf_counter()
    llm.generate(ps, sp, use_tqdm=False)
    out[name] = time.perf_counter() - t
print("TIMES " + json.dumps(out), flush=True)
"""

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
}


def main() -> None:
    from hpc_infer.models.cpu_model import ensure_smollm2

    model = str(ensure_smollm2())
    flags = sorted(
        {
            f
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for f in line.split()
            if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
        }
    )
    times = {}
    for dtype in ("bfloat16", "float32"):
        p = subprocess.run(
            [sys.executable, "-c", CHILD, model, dtype], capture_output=True, text=True, env=dict(os.environ, **ENV)
        )
        line = next((x for x in p.stdout.splitlines() if x.startswith("TIMES ")), None)
        if line is None:
            sys.exit(f"{dtype} failed:\n{p.stderr[-3000:]}")
        times[dtype] = json.loads(line[6:])
    print(f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores")
    for case in times["float32"]:
        bf, fp = times["bfloat16"][case], times["float32"][case]
        print(f"{case:34s} bfloat16 {bf:7.2f} s   float32 {fp:7.2f} s   bf16/fp32 {bf / fp:5.2f}x")


if __name__ == "__main__":
    main()
