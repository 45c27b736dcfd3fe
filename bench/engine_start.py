"""A worker's engine start on the CPU default, in phases, side by side with the floor.

    .venv/bin/python bench/engine_start.py [--reps 2]

Each measurement is a fresh process (what every array task pays). Phases of our start:
interpreter, `import torch`, `import vllm`, our worker modules, then the worker's own
engine build (worker/vllm_engine.py's `Engine`, the CPU default's settings: float32, eager)
split by vLLM's log lines into weight read and profiling / KV cache / warm-up, the rest
being config, tokenizer, vLLM's engine-side imports and model init (vLLM reads config and
tokenizer inside `LLM(...)`; the worker does not read them again), and the first token
of one greedy request. The floor is a bare
`import vllm` plus one read of the weight files; beside it, a bare vLLM script (LLM(...)
with the same settings and one token, nothing of ours), so what is ours and what is
vLLM's own start shows. The first repetition runs with cold
caches as far as this machine lets us (weights not read since the last repetition's
`posix_fadvise(DONTNEED)`); later ones are warm (page cache, .pyc files).
Prints the ratios; measurement only, nothing asserted.

    --load-formats auto,sharded_state,runai_streamer,fastsafetensors [--extra-path DIR]

starts the engine once per `model.load_format` (warm page cache, a fresh process each):
`sharded_state` from a copy written first by `hpc-infer cache shard`'s own function, the
others from the model; their packages from DIR (`pip install --target DIR
runai-model-streamer humanize fastsafetensors`, kept out of the project's venv). A format
the CPU build refuses prints its error.

    --compile

starts the engine twice with torch.compile on (enforce_eager=False) against one shared
compile cache (host/compile_cache.py): the first start compiles and publishes, the
second is seeded from the published copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
t = {"start": float(sys.argv[1])}
t["interpreter"] = time.time()
import torch
t["torch"] = time.time()
import vllm
t["vllm"] = time.time()
from hpc_infer.worker import worker, vllm_engine as engine  # our worker's own modules
from hpc_infer import rundir
from hpc_infer.rundir import claims
t["ours"] = time.time()
# the worker's own engine build, from the model entry a run's worker.json gives it (CPU default)
model = {"path": sys.argv[2], "task": "auto", "engine_kwargs": {"dtype": "float32", "enforce_eager": True,
         "max_model_len": 2048, "seed": 0, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}}
e = engine.VllmEngine(model)
t["llm"] = time.time()
from vllm import SamplingParams
e.llm.generate(["The capital of France is"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
t["first_token"] = time.time()
print("TIMES " + json.dumps(t), flush=True)
"""

FLOOR = r"""
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
"""

BARE = r"""
import sys, time
t0 = float(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[2], dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
llm.generate(["The capital of France is"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
print(f"BARE {time.time() - t0}", flush=True)
"""

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


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
    p = subprocess.run(
        [sys.executable, "-c", code, repr(time.time()), str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return p.stdout, p.stderr


def vllm_phases(log: str) -> dict[str, float]:
    """vLLM's own phase times from its log (weights; profile + KV cache + warm-up)."""
    import re

    out = {}
    m = re.search(r"Loading weights took ([\d.]+) seconds", log) or re.search(
        r"Model loading took .*? and ([\d.]+) seconds", log
    )
    if m:
        out["weights"] = float(m.group(1))
    m = re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", log)
    if m:
        out["profile_kv_warmup"] = float(m.group(1))
    return out


LOADER = r"""
import json, sys, time
t0 = time.time()
from vllm import LLM, SamplingParams
kw = json.loads(sys.argv[3])
cache = None
if kw.pop("compile_cache", None):
    from hpc_infer.host.compile_cache import open_cache
    cache = open_cache(sys.argv[4], "bench", 1, 1)
t1 = time.time()
llm = LLM(model=sys.argv[2], dtype="bfloat16", max_model_len=2048, enable_chunked_prefill=False,
          max_num_batched_tokens=2048, **kw)
t2 = time.time()
text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0].outputs[0].text
print("LOADED " + json.dumps({"import": t1 - t0, "llm": t2 - t1, "text": text,
      "cache": dict(cache.describe(), published=cache.publish()) if cache else None}), flush=True)
"""


def start_with(model: Path, kw: dict, extra_path: str | None = None, cache_root: str = "") -> dict:
    """One fresh engine start with these LLM(...) arguments: times, vLLM's phases, or its error."""
    env = dict(os.environ, **ENV)
    if extra_path:
        env["PYTHONPATH"] = f"{extra_path}:{env.get('PYTHONPATH', '')}"
    p = subprocess.run(
        [sys.executable, "-c", LOADER, repr(time.time()), str(model), json.dumps(kw), cache_root],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if p.returncode:
        lines = [ln for ln in p.stderr.splitlines() if "Error" in ln or "error" in ln]
        return {"error": (lines[-1] if lines else p.stderr[-300:]).strip()}
    out = json.loads(p.stdout.split("LOADED ", 1)[1].splitlines()[0])
    return {**out, **vllm_phases(p.stdout + p.stderr)}  # vLLM logs to stdout


def load_formats(model: Path, formats: list[str], extra_path: str | None) -> None:
    import tempfile

    print("\nweight loaders (warm page cache; a fresh process each; LLM(...) = engine build to ready):")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    base = None
    for fmt in formats:
        path = model
        if fmt == "sharded_state":
            path = tmp / "copy"
            code = (
                "import sys; from pathlib import Path; from hpc_infer.models.load_format import write_sharded_state; "
                "write_sharded_state(sys.argv[1], Path(sys.argv[2]), 1, 1, 'bfloat16')"
            )
            subprocess.run(
                [sys.executable, "-c", code, str(model), str(path)],
                check=True,
                capture_output=True,
                env=dict(os.environ, **ENV),
                timeout=1800,
            )
        r = start_with(path, {"load_format": fmt, "enforce_eager": True}, extra_path)
        if "error" in r:
            print(f"  {fmt:16} refused by this build: {r['error'][:200]}")
            continue
        base = base or r["llm"]
        weights = f"{r['weights']:.2f} s" if "weights" in r else "not in vLLM's log"
        print(
            f"  {fmt:16} LLM(...) {r['llm']:6.2f} s (x{r['llm'] / base:.2f} of the first), weights "
            f"{weights}, greedy text {r['text']!r}"
        )


def compile_starts(model: Path) -> None:
    import tempfile

    root = tempfile.mkdtemp(prefix="bench-compile-")
    print("\ntorch.compile on (enforce_eager=False), one shared compile cache:")
    eager = start_with(model, {"enforce_eager": True})
    print(f"  eager, for reference     LLM(...) {eager['llm']:6.2f} s")
    for which in ("first (compiles, publishes)", "second (seeded from the shared copy)"):
        r = start_with(model, {"enforce_eager": False, "compile_cache": True}, cache_root=root)
        if "error" in r:
            print(f"  {which}: refused by this build: {r['error'][:200]}")
            return
        c = r["cache"]
        print(
            f"  {which:36} LLM(...) {r['llm']:6.2f} s (x{r['llm'] / eager['llm']:.2f} of eager); seeded "
            f"{c['seeded']} entries, published {len(c['published'])}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--load-formats", default=None, help="comma-separated model.load_format values to compare")
    ap.add_argument("--extra-path", default=None, help="a pip --target directory with the loaders' packages")
    ap.add_argument("--compile", action="store_true", help="cold vs seeded start with torch.compile on")
    args = ap.parse_args()
    from hpc_infer.models.cpu_model import ensure_smollm2

    model = Path(ensure_smollm2())
    if args.load_formats:
        load_formats(model, args.load_formats.split(","), args.extra_path)
    if args.compile:
        compile_starts(model)
    if args.load_formats or args.compile:
        return
    rows = []
    for rep in range(args.reps):
        kind = "cold" if rep == 0 else "warm"
        if rep == 0:
            drop_cache(model)
        out, err = run(CHILD, model)
        t = json.loads(out.split("TIMES ", 1)[1].splitlines()[0])
        phases = {
            "interpreter": t["interpreter"] - t["start"],
            "import torch": t["torch"] - t["interpreter"],
            "import vllm": t["vllm"] - t["torch"],
            "import ours": t["ours"] - t["vllm"],
            "engine build": t["llm"] - t["ours"],
            "first token": t["first_token"] - t["llm"],
        }
        total = t["first_token"] - t["start"]
        if rep == 0:
            drop_cache(model)
        fout, _ = run(FLOOR, model)
        imp, read, nbytes = fout.split("FLOOR ", 1)[1].split()[:3]
        floor = float(imp) + float(read)
        if rep == 0:
            drop_cache(model)
        bout, _ = run(BARE, model)
        bare = float(bout.split("BARE ", 1)[1].split()[0])
        rows.append((kind, phases, vllm_phases(out + err), total, floor, float(imp), float(read), bare))
    for kind, phases, vp, total, floor, imp, read, bare in rows:
        print(f"[{kind}] our worker's start to first token: {total:.1f} s")
        for k, v in phases.items():
            print(f"    {k:18} {v:6.2f} s")
        if vp:
            rest = phases["engine build"] - sum(vp.values())
            print(
                "    of the engine build, vLLM's own log: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in vp.items())
                + f"; the rest (config, tokenizer, vLLM's engine-side imports, model init) {rest:.2f} s"
            )
        print(f"  floor (bare `import vllm` {imp:.2f} s + one read of the weights {read:.2f} s): {floor:.2f} s")
        print(f"  ratio start/floor = {total / floor:.2f}")
        print(
            f"  bare vLLM (a script: LLM(...) with the same settings, one token; no hpc_infer): {bare:.2f} s; "
            f"ratio start/bare vLLM = {total / bare:.2f}"
        )


if __name__ == "__main__":
    main()
