"""What a launch pays before it submits, with and without a remembered sampling check.

    .venv/bin/python bench/launch_check.py [--reps 3]

Each repetition starts from an empty check cache (HPC_INFER_CACHE in a temp dir, the
model found through the real cache) and runs the same `hpc-infer sbatch` command twice in
fresh processes: the first builds the run's SamplingParams with the installed vLLM
(importing it), the second finds that check passed before (models/vllm_check.py). sbatch
plans, checks and writes the script exactly as launch does before submitting, and submits
nothing, so the two differ only in the check. Prints both times and their ratio;
measurement only, nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict, cwd: str) -> tuple[float, str]:
    t = time.time()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return time.time() - t, next((ln for ln in p.stderr.splitlines() if "sampling" in ln and "checked" in ln), "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from hpc_infer.models.cpu_model import cache_root, ensure_smollm2

    model = ensure_smollm2()
    first, again = [], []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
            (Path(tmp) / "models").symlink_to(cache_root() / "models")  # the built model, an empty check cache
            env = dict(os.environ, HPC_INFER_CACHE=tmp)
            for name, into in (("a", first), ("b", again)):
                s, said = timed(
                    [
                        str(BIN / "hpc-infer"),
                        "sbatch",
                        "cluster=slurm_local",
                        "data=example_prompts",
                        "data.limit=2",
                        "sampling=greedy",
                        f"run_name={name}",
                        f"output_root={tmp}/runs",
                    ],
                    env,
                    tmp,
                )
                into.append(s)
                print(f"  rep {rep} run {name}: {s:6.2f} s   {said.strip()}")
    print(
        f"\nmodel {model}; CPU flags: "
        + " ".join(sorted({f for f in open("/proc/cpuinfo").read().split() if f in ("avx2", "avx512f", "amx_tile")}))
    )
    a, b = statistics.median(first), statistics.median(again)
    print(f"hpc-infer sbatch (plan, checks, script; no submission), median of {args.reps}:")
    print(f"  sampling checked with vLLM imported   {a:6.2f} s")
    print(f"  the same check remembered            {b:6.2f} s")
    print(f"  ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
