"""A straggler without and with the tail policies, on real vLLM workers, side by side.

Two workers on one run: one slowed by a failpoint (a sleep at every engine step, i.e. a
slow GPU or a noisy node), one normal. Wall time until every chunk is done with neither
policy (`cluster.max_backups=0 cluster.straggler_pacing=false`: everyone waits for the
straggler), with backup copies only (the idle worker re-executes the straggler's
chunk), and with the default, backups plus straggler pacing (the slow worker holds a
smaller batch and leaves the last sixth of the work to the other). Also prints the
summed worker lifetime, which includes the losing copies.
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


def one(tmp: Path, backups: int, pacing: bool, sleep_ms: int, max_tokens: int) -> dict:
    from conftest import compose
    from hpc_infer.models.cpu_model import ensure_smollm2
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.rundir import read_json

    rc = compose(
        "data=example",
        "sampling=greedy",
        f"sampling.max_tokens={max_tokens}",
        "+sampling.extra.ignore_eos=true",
        "cluster=local",
        "cluster.workers=2",
        "cluster.max_chunks_in_flight=1",
        "cluster.heartbeat_s=1",
        f"cluster.max_backups={backups}",
        f"cluster.straggler_pacing={pacing}",
        f"output_root={tmp}/runs",
        f"run_name=b{backups}{pacing}",
    )
    run, _ = prepare(rc, plan_input(rc), str(ensure_smollm2()), "")
    n = read_json(run.manifest)["n_chunks"]
    t0 = time.time()
    procs = []
    for wid, env in (("slow", {"HPC_INFER_FAULT": f"step:SLEEP{sleep_ms}"}), ("fast", {})):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hpc_infer.worker", str(run.root), "--worker-id", wid],
                env=dict(os.environ, **CPU_ENV, **env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        while wid == "slow" and not run.claim_path(0).exists():
            time.sleep(0.1)
    while len(run.done_chunks()) < n:
        time.sleep(0.2)
    done = time.time() - t0
    for p in procs:
        p.wait()
    beats = {w: read_json(run.heartbeats / f"{w}.json") for w in ("slow", "fast")}
    busy = sum(b.get("finished_at", time.time()) - b["started"] for b in beats.values())
    return {
        "done_s": done,
        "busy_s": busy,
        "backups": beats["fast"].get("backups", 0),
        "pace": beats["slow"].get("pace"),
        "straggler": beats["slow"].get("straggler"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-ms", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = one(Path(tmp), 0, False, args.sleep_ms, args.max_tokens)
        backups = one(Path(tmp), 2, False, args.sleep_ms, args.max_tokens)
        both = one(Path(tmp), 2, True, args.sleep_ms, args.max_tokens)
    print(f"2 workers, one slowed by {args.sleep_ms} ms per engine step; 16 prompts x {args.max_tokens} tokens")
    print(
        f"all chunks done: neither {off['done_s']:.1f} s; backups only {backups['done_s']:.1f} s "
        f"(ratio {backups['done_s'] / off['done_s']:.2f}, {backups['backups']} backup copies); backups + pacing "
        f"(default) {both['done_s']:.1f} s (ratio {both['done_s'] / off['done_s']:.2f}, {both['backups']} backup copies)"
    )
    print(
        f"worker lifetime summed (incl. losing copies): {off['busy_s']:.1f} s, {backups['busy_s']:.1f} s, "
        f"{both['busy_s']:.1f} s"
    )
    print(f"with pacing, the slow worker's last heartbeat: pace {both['pace']}, straggler {both['straggler']}")


if __name__ == "__main__":
    main()
