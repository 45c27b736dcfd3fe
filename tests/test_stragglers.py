"""Backup copies of the tail (MapReduce's backup tasks) on real vLLM workers.

One worker is held by a failpoint (at its first engine step, until the test lets it go)
among a normal one.
Once nothing is left to claim, the idle normal worker re-executes the chunk the slow one
holds; the first complete output wins, the other copy is dropped, and the merge has
every record exactly once. How much sooner the run ends is measured in
bench/stragglers.py, not asserted here.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import compose, hold_env, release, wait_held

from hpc_infer.run.merge import merge
from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rundir import read_chunk_trailer, read_json

pytestmark = pytest.mark.slow
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _worker(run, worker_id, log, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "hpc_infer.worker", str(run.root), "--worker-id", worker_id],
        env=dict(os.environ, **CPU_ENV, **env),
        stdout=log,
        stderr=log,
    )


def test_idle_worker_backs_up_the_straggler_and_the_merge_stays_exactly_once(tmp_path, cpu_model):
    rc = compose(
        "data=example",
        "sampling=greedy",
        "sampling.max_tokens=12",
        "+sampling.extra.ignore_eos=true",
        "cluster=local",
        "cluster.workers=2",
        "cluster.max_chunks_in_flight=1",
        "cluster.heartbeat_s=1",
        f"output_root={tmp_path}/runs",
    )
    run, _ = prepare(rc, plan_input(rc), cpu_model, "")
    n_records = read_json(run.manifest)["n_records"]
    with open(tmp_path / "slow.log", "w") as slow_log, open(tmp_path / "fast.log", "w") as fast_log:
        # the straggler: it claims chunk 0 (the largest) and stops at its first engine step
        # until released (a failpoint, not a sleep that must outlast the other's load)
        slow = _worker(run, "slow", slow_log, **hold_env(tmp_path, "step"))
        wait_held(tmp_path)
        fast = _worker(run, "fast", fast_log)
        assert fast.wait(timeout=1800) == 0, (tmp_path / "fast.log").read_text()[-3000:]
        release(tmp_path)  # the fast one did every other chunk and a backup copy of chunk 0
        assert slow.wait(timeout=1800) == 0, (tmp_path / "slow.log").read_text()[-3000:]
    from hpc_infer.rundir import tail

    marker = run.root / tail.BACKUPS / "00000"
    assert json.loads(marker.read_text())["worker"] == "fast"  # the idle worker backed up the straggler's chunk
    beats = {b: read_json(run.heartbeats / f"{b}.json") for b in ("slow", "fast")}
    assert beats["fast"].get("backups") == 1
    trailer, _ = read_chunk_trailer(run.out_path(0))
    # the backup won (the straggler was held until it had); the straggler's copy was dropped
    assert trailer["worker"] == "fast" and beats["slow"].get("abandoned", 0) >= 1, (trailer, beats["slow"])
    s = merge(run)
    rows = [json.loads(line) for line in open(s.results)]
    assert [r["index"] for r in rows] == list(range(n_records))
