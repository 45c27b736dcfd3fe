"""A straggler with and without backup copies, on real vLLM workers, side by side.

Two workers on one run: one slowed by a failpoint (a sleep at every engine step, i.e. a
slow GPU or a noisy node), one normal. Wall time until every chunk is done, with
`cluster.max_backups=0` (today's tail: everyone waits for the straggler) and with the
default (2): the idle worker re-executes the straggler's chunk. Also prints the extra
engine time the backup cost.
    .venv/bin/python bench/stragglers.py [--sleep-ms 1000] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def one(tmp: Path, backups: int, sleep_ms: int, max_tokens: int) -> dict:
    from conftest import compose
    from hpc_infer.models.cpu_model import ensure_smollm2
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.worker.rundir import read_json

    rc = compose("data=example", "sampling=greedy", f"sampling.max_tokens={max_tokens}",
                 "+sampling.extra.ignore_eos=true", "cluster=local", "cluster.workers=2",
                 "cluster.max_chunks_in_flight=1", "cluster.heartbeat_s=1", f"cluster.max_backups={backups}",
                 f"output_root={tmp}/runs", f"run_name=b{backups}")
    run, _ = prepare(rc, plan_input(rc), str(ensure_smollm2()), "")
    n = read_json(run.manifest)["n_chunks"]
    t0 = time.time()
    procs = []
    for wid, env in (("slow", {"HPC_INFER_FAULT": f"step:SLEEP{sleep_ms}"}), ("fast", {})):
        procs.append(subprocess.Popen([sys.executable, "-m", "hpc_infer.worker", str(run.root), "--worker-id", wid],
                                      env=dict(os.environ, **CPU_ENV, **env), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        while wid == "slow" and not run.claim_path(0).exists():
            time.sleep(0.1)
    while len(run.done_chunks()) < n:
        time.sleep(0.2)
    done = time.time() - t0
    for p in procs:
        p.wait()
    beats = {w: read_json(run.heartbeats / f"{w}.json") for w in ("slow", "fast")}
    busy = sum(b.get("finished_at", time.time()) - b["started"] for b in beats.values())
    return {"done_s": done, "busy_s": busy, "backups": beats["fast"].get("backups", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-ms", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = one(Path(tmp), 0, args.sleep_ms, args.max_tokens)
        on = one(Path(tmp), 2, args.sleep_ms, args.max_tokens)
    print(f"2 workers, one slowed by {args.sleep_ms} ms per engine step; 16 prompts x {args.max_tokens} tokens")
    print(f"all chunks done: no backups {off['done_s']:.1f} s, with backups {on['done_s']:.1f} s "
          f"(ratio {on['done_s'] / off['done_s']:.2f}; {on['backups']} backup copies)")
    print(f"worker lifetime summed (engine time incl. the losing copy): {off['busy_s']:.1f} s vs {on['busy_s']:.1f} s")


if __name__ == "__main__":
    main()
