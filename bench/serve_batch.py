"""Batch through a live replica vs. the offline worker, same prompts and model, one run.

throughput - output tokens per second of generation, once warm: the offline worker's
             vs. a launch through a running replica, each with its engine start excluded
             (vLLM's import and model load; the HTTP client's start and /health check)
three sets - end to end for three successive small prompt sets: three offline launches
             (a model load each) vs. one `hpc-infer serve` start plus three launches
             through it (the model loaded once)
  .venv/bin/python bench/serve_batch.py [--prompts 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CACHE = os.environ.get("HPC_INFER_CACHE", str(Path.home() / ".cache" / "hpc_infer"))  # the built CPU model


def user_env(tmp: Path) -> dict:
    """The installed `hpc-infer` on PATH, a fresh HOME (its own API keys), the built CPU model."""
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(tmp / "home"), HPC_INFER_CACHE=CACHE)


def launch(tmp: Path, name: str, data: Path, max_tokens: int, *extra: str) -> tuple[float, dict]:
    env = user_env(tmp)
    t = time.time()
    p = subprocess.run(
        [
            "hpc-infer",
            "launch",
            "cluster=local",
            f"data.path={data}",
            "sampling=greedy",
            f"sampling.max_tokens={max_tokens}",
            "+sampling.extra.ignore_eos=true",
            f"run_name={name}",
            f"output_root={tmp}/runs",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])
    return wall, json.loads((tmp / "runs" / name / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "home").mkdir()
        sets = []
        for k in range(3):
            data = tmp / f"set{k}.jsonl"
            data.write_text(
                "".join(
                    json.dumps({"prompt": f"Set {k}, item {i}: write one sentence about the number {i * 7 + k}."})
                    + "\n"
                    for i in range(args.prompts)
                )
            )
            sets.append(data)
        env = user_env(tmp)
        t = time.time()
        offline = [launch(tmp, f"off{k}", d, args.max_tokens) for k, d in enumerate(sets)]
        t_offline = time.time() - t
        t = time.time()
        s = subprocess.run(
            ["hpc-infer", "serve", "cluster=local", "run_name=srv", f"output_root={tmp}/runs"],
            env=env,
            capture_output=True,
            text=True,
        )
        if s.returncode != 0:
            sys.exit(s.stderr[-3000:])
        t_serve = time.time() - t
        served = [
            launch(tmp, f"srv{k}", d, args.max_tokens, f"cluster.endpoint={tmp}/runs/srv") for k, d in enumerate(sets)
        ]
        t_served = time.time() - t
        subprocess.run(["hpc-infer", "serve", "stop", f"{tmp}/runs/srv"], env=env, capture_output=True)

    def gen_rate(summary: dict) -> float:
        engine = max(summary.get("engine_start_s") or [0])
        return summary["output_tokens"] / max(summary["wall_s"] - engine, 1e-9)

    off_rate = sum(gen_rate(s) for _, s in offline) / 3
    srv_rate = sum(gen_rate(s) for _, s in served) / 3  # its "engine start": the HTTP client and /health
    print(f"{args.prompts} prompts x {args.max_tokens} tokens (greedy, ignore_eos), SmolLM2 on vLLM's CPU build")
    print(
        f"throughput once warm: offline {off_rate:,.0f} tok/s, through a live replica {srv_rate:,.0f} tok/s: "
        f"ratio {srv_rate / off_rate:.2f}"
    )
    print(
        f"three prompt sets end to end: offline {t_offline:.1f} s ({', '.join(f'{w:.1f}' for w, _ in offline)}); "
        f"serve start {t_serve:.1f} s + three launches ({', '.join(f'{w:.1f}' for w, _ in served)}) = "
        f"{t_served:.1f} s: ratio served/offline {t_served / t_offline:.2f}"
    )


if __name__ == "__main__":
    main()
