"""Our worker path vs. a bare `LLM.generate` over the same prompts, measured side by side.

Both sides run as fresh processes with the same engine settings, prompts and sampling
(fixed-length greedy output, ignore_eos), alternating, so import and engine start are
counted on both sides. "ours" is the whole `python -m hpc_infer.launch cluster=debug`:
Hydra, planning, chunk claims, heartbeats, the worker, atomic writes and the merge.

    .venv/bin/python bench/worker_efficiency.py [--prompts 256] [--max-tokens 64] [--reps 2]

Prints wall times, output tokens/s and the ratio bare/ours (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
}

BARE = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    from vllm import LLM, SamplingParams
    prompts = [json.loads(l)["prompt"] for l in open(sys.argv[1])]
    llm = LLM(model=sys.argv[2], dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)  # as model=smollm2_cpu
    t1 = time.time()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), ignore_eos=True),
                        use_tqdm=False)
    t2 = time.time()
    print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "gen_s": t2 - t1}))
""")


def make_prompts(path: Path, n: int) -> None:
    seeds = [l for l in (ROOT / "hpc_infer/data_files/example_prompts.txt").read_text().splitlines() if l]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"{seeds[i % len(seeds)]} (variant {i})"}) + "\n")


def run_bare(data: Path, model: str, max_tokens: int) -> dict:
    t = time.time()
    p = subprocess.run(
        [sys.executable, "-c", BARE, str(data), model, str(max_tokens)],
        capture_output=True,
        text=True,
        env=dict(os.environ, **CPU_ENV),
        check=True,
    )
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t
    return res


def run_ours(data: Path, out: Path, max_tokens: int, rep: int) -> dict:
    t = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_infer.launch",
            "cluster=debug",
            f"data.path={data}",
            "sampling=greedy",
            f"sampling.max_tokens={max_tokens}",
            "sampling.ignore_eos=true",
            f"output_root={out}",
            f"run_name=rep{rep}",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, **CPU_ENV),
        check=True,
        cwd=out,
    )
    wall = time.time() - t
    summary = json.loads((out / f"rep{rep}" / "summary.json").read_text())
    return {"tokens": summary["output_tokens"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from hpc_infer.models.cpu_model import ensure_smollm2

    model = str(ensure_smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "prompts.jsonl"
        make_prompts(data, args.prompts)
        bare, ours = [], []
        for rep in range(args.reps):
            bare.append(run_bare(data, model, args.max_tokens))
            ours.append(run_ours(data, tmp, args.max_tokens, rep))
            print(f"rep {rep}: bare {bare[-1]['wall_s']:.1f}s  ours {ours[-1]['wall_s']:.1f}s", flush=True)
    b = statistics.median(r["wall_s"] for r in bare)
    o = statistics.median(r["wall_s"] for r in ours)
    assert bare[0]["tokens"] == ours[0]["tokens"], (bare[0]["tokens"], ours[0]["tokens"])
    tokens = ours[0]["tokens"]
    print(f"prompts={args.prompts} max_tokens={args.max_tokens} output tokens={tokens} reps={args.reps}")
    print(f"bare LLM.generate (process wall, median): {b:7.1f} s  {tokens / b:7.0f} tok/s")
    print(f"hpc_infer launch  (process wall, median): {o:7.1f} s  {tokens / o:7.0f} tok/s")
    print(f"efficiency bare/ours = {b / o:.3f}")


if __name__ == "__main__":
    main()
