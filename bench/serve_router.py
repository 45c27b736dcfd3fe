"""The same batch through the router and through the client's own round-robin, one serve run.

    .venv/bin/python bench/serve_router.py [--replicas 2] [--requests 96] [--max-tokens 32]
        [--concurrency 16] [--passes 3] [--policy round_robin] [--cluster local]

Starts `hpc-infer serve serve.replicas=N` (the installed console script, a fresh HOME),
then alternates passes: the batch through the router's one URL, and the same batch with
the `openai` client itself spreading requests round-robin over the replicas' URLs (what a
user without a router writes), each with the same number of requests in flight. Prints
output tokens per second of each pass, the ratio router / client round-robin (goal >=
0.95) and the share of requests each replica served in the router's passes (from each
replica's own request counter). Stops the serve run at the end. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CACHE = os.environ.get("HPC_INFER_CACHE", str(Path.home() / ".cache" / "hpc_infer"))  # the built CPU model
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def batch(clients: list, requests: int, max_tokens: int, concurrency: int) -> tuple[float, int]:
    """Wall seconds and output tokens for `requests` completions; request i goes to client i % n."""

    def one(i):
        r = clients[i % len(clients)].completions.create(
            model=MODEL,
            prompt=f"Request {i}: a short story about",
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.usage.completion_tokens

    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return time.time() - t, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--policy", default="round_robin")
    ap.add_argument("--cluster", default="local")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from openai import OpenAI

    from hpc_infer.serve.replica import metrics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HOME=str(tmp / "home"), HPC_INFER_CACHE=CACHE)
        root = tmp / "runs" / "bench"
        t = time.time()
        p = subprocess.run(
            [
                "hpc-infer",
                "serve",
                f"cluster={args.cluster}",
                f"serve.replicas={args.replicas}",
                "serve.router=true",
                f"serve.router_policy={args.policy}",
                "model.dtype=float32",
                "run_name=bench",
                f"output_root={tmp}/runs",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        try:
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            print(f"serve: {args.replicas} replicas and the router ready in {time.time() - t:.0f} s")
            key = (tmp / "home/.config/hpc_infer/keys/bench.key").read_text().strip()
            router = json.loads((root / "serve" / "router.json").read_text())["url"]
            urls = [json.loads((root / "serve" / f"{i}.json").read_text())["url"] for i in range(args.replicas)]
            make = lambda u: OpenAI(base_url=u, api_key=key, max_retries=0, timeout=600)  # noqa: E731
            via_router, direct = [make(router)], [make(u) for u in urls]
            batch(direct, args.replicas * 2, 4, args.concurrency)  # warm both servers
            rates = {"router": [], "client round-robin": []}
            served = [0.0] * args.replicas
            for n in range(args.passes):
                for name, clients in (("router", via_router), ("client round-robin", direct)):
                    before = [metrics(u.removesuffix("/v1"), key=key)["requests"] for u in urls]
                    wall, tokens = batch(clients, args.requests, args.max_tokens, args.concurrency)
                    after = [metrics(u.removesuffix("/v1"), key=key)["requests"] for u in urls]
                    if name == "router":
                        served = [s + a - b for s, a, b in zip(served, after, before)]
                    rates[name].append(tokens / wall)
                    print(
                        f"pass {n + 1} {name:18} {args.requests} requests x {args.max_tokens} tokens: "
                        f"{wall:6.2f} s, {tokens / wall:7.1f} output tok/s"
                    )
            mean = {k: sum(v) / len(v) for k, v in rates.items()}
            print(
                f"\nthroughput router / client round-robin: {mean['router'] / mean['client round-robin']:.3f} "
                f"({mean['router']:.1f} vs {mean['client round-robin']:.1f} output tok/s, mean of {args.passes} "
                f"passes each, policy {args.policy})"
            )
            total = sum(served) or 1
            print(
                "share of the router's requests per replica: "
                + ", ".join(f"replica {i} {100 * s / total:.1f}%" for i, s in enumerate(served))
            )
        finally:
            subprocess.run(["hpc-infer", "serve", "stop", str(root)], env=env, capture_output=True, text=True)


if __name__ == "__main__":
    main()
