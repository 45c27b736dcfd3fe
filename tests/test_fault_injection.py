"""Randomized fault injection: kill real vLLM workers anywhere, damage their files, relaunch.

Each trial plans a run, starts a real worker process (vLLM CPU, SmolLM2) and kills it
with SIGKILL, or stops it with SIGTERM (which the worker handles: it takes its attempts
back and releases its claims), at a random failpoint every run reaches (after a claim,
mid-generation, between the fsync and the link of a chunk output, right after it, while
writing a heartbeat); each trial asserts its fault took effect (the process died by
SIGKILL, or stopped by SIGTERM with that in its heartbeat). Then one random disk fault: a
byte flipped in a finished output, a line duplicated, another chunk's file copied over,
a claim file removed, a stray temp file. Recovery is what a user does: relaunch the same
command (here in process, cluster=debug); the launch moves a damaged output aside and
redoes its chunk (said on its output). Half the trials also kill a merge between writing the result
and renaming it. A third of the trials hold a poison record: a record that ends the
engine's process whenever it enters a batch (the victim is SIGKILLed/SIGTERMed there;
in the relaunches, which run in this process, the same failpoint raises, as vLLM does
when its engine core dies). Every trial must end with every record exactly once, and
every poison record as its own `engine_died` error record (rundir/isolate.py), and every
other record's text equal to a run of the same input without faults.

These are the trials with real vLLM workers; tests/test_sharedfs.py runs more with the
FakeEngine, through two client mounts of a shared-file-system stand-in.
HPC_INFER_FAULT_TRIALS (default 3) sets the trial count; HPC_INFER_FAULT_SEED replays.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, ROOT, compose

from hpc_infer.errors import UserError
from hpc_infer.launch import launch
from hpc_infer.run.merge import merge
from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rundir import RunDir, read_json

pytestmark = pytest.mark.slow

N_RECORDS = 24
MAX_TOKENS = 6
POINTS = ["claimed", "step", "tmp_written@/out/", "renamed@/out/", "renamed@/heartbeats/"]  # each reached in every run
DISK_FAULTS = ["none", "flip_byte", "duplicate_line", "foreign_file", "remove_claim", "stray_tmp"]
REFUSAL = {
    "flip_byte": "do not match their checksum",
    "duplicate_line": "bytes of records, its trailer says",
    "foreign_file": "holds the output of chunk",
}
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _overrides(tmp: Path, data: Path) -> list[str]:
    return [
        f"data.path={data}",
        "sampling=greedy",
        f"sampling.max_tokens={MAX_TOKENS}",
        "sampling.ignore_eos=true",
        "chunks_per_worker=8",
        "cluster.max_chunks_in_flight=2",
        "cluster.heartbeat_s=1",
        "cluster.lease_s=30",
        f"output_root={tmp / 'runs'}",
        "run_name=t",
    ]


def _kill_victim(run: RunDir, rng: random.Random, log: Path, poison: str | None) -> str:
    """Run one worker process and kill it; returns what happened."""
    point, sig = rng.choice(POINTS), rng.choice(["KILL", "TERM"])
    env = dict(os.environ, **CPU_ENV)
    nth = 1  # reached in every run: a trial whose fault never fired would prove nothing
    if poison:
        point = f"record@{poison}"
    env["HPC_INFER_FAULT"] = f"{point}:{sig}:{nth}"
    cmd = [sys.executable, "-m", "hpc_infer.worker", str(run.root), "--worker-id", "victim"]
    with open(log, "w") as out:
        rc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out).wait(timeout=300)
    if sig == "KILL":
        assert rc == -signal.SIGKILL, f"{point}:KILL: the fault was not reached (exit {rc}): {log.read_text()[-2000:]}"
        return f"{point}:KILL -> killed"
    beat = read_json(run.heartbeat_path("victim"))
    assert (
        rc == 128 + signal.SIGTERM and beat.get("state") == "stopped" and "SIGTERM" in beat.get("stopped_because", "")
    ), f"{point}:TERM: the fault was not reached (exit {rc}, {beat.get('state')}): {log.read_text()[-2000:]}"
    return f"{point}:TERM -> stopped (attempts taken back, claims released)"


def _disk_fault(run: RunDir, rng: random.Random) -> tuple[str, Path | None]:
    done = sorted(run.done_chunks())
    kind = rng.choice(DISK_FAULTS)
    if kind in ("flip_byte", "duplicate_line") and not done or kind == "foreign_file" and len(done) < 2:
        kind = "remove_claim"
    if kind == "remove_claim" and not run.claimed_chunks():
        kind = "stray_tmp"
    if kind == "flip_byte":
        path = run.out_path(rng.choice(done))
        data = bytearray(path.read_bytes())
        body = data.rfind(b"\n", 0, len(data) - 1)  # flip inside the records, not the trailer
        i = rng.randrange(0, body)
        data[i] = ord("#") if data[i] != ord("#") else ord("%")
        path.write_bytes(bytes(data))
        return kind, path
    if kind == "duplicate_line":
        path = run.out_path(rng.choice(done))
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1] + [rng.choice(lines[:-1]), lines[-1]]))
        return kind, path
    if kind == "foreign_file":
        a, b = rng.sample(done, 2)
        run.out_path(b).write_bytes(run.out_path(a).read_bytes())
        return kind, run.out_path(b)
    if kind == "remove_claim":
        rng.choice(sorted(run.claims.iterdir())).unlink()
    if kind == "stray_tmp":
        (run.out / f".{run.out_path(0).name}.x1y2.tmp").write_bytes(b'{"half": ')
    return kind, None


def _recover(rc_overrides: list[str], damaged: Path | None, expect: str | None, poison: str | None) -> tuple[int, bool]:
    """Relaunch as a user would; when the merge refuses, delete what it names and relaunch;
    when the poison record kills the (in-process) worker, relaunch. Returns the relaunches
    and whether a refusal was observed."""
    relaunches, refused = 0, False
    for _ in range(3 + (12 if poison else 0)):
        relaunches += 1
        try:
            if poison:
                os.environ["HPC_INFER_FAULT"] = f"record@{poison}:RAISE"
            launch(compose("cluster=debug", *rc_overrides), "")
            return relaunches, refused
        except RuntimeError as e:
            assert poison and "injected fault at record" in str(e), e
        except UserError as e:
            msg = str(e)
            assert expect and expect in msg, msg
            named = re.search(r"delete (\S+) and relaunch", msg)
            assert named and Path(named.group(1)) == damaged, msg  # the damaged chunk, by name
            damaged.unlink()
            expect, refused = None, True
        finally:
            os.environ.pop("HPC_INFER_FAULT", None)
    raise AssertionError(f"{relaunches} relaunches did not finish the run")


def _input(tmp: Path, prompts: list[str]) -> Path:
    data = tmp / "in.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": f"{prompts[i % len(prompts)]} ({i})"}) + "\n" for i in range(N_RECORDS)
        )
    )
    return data


def _reference(tmp: Path, prompts: list[str]) -> dict[str, str]:
    """The same run without faults (in this process): what every trial must end with."""
    tmp.mkdir()
    run = launch(compose("cluster=debug", *_overrides(tmp, _input(tmp, prompts))), "")
    return {r["id"]: r["text"] for r in map(json.loads, Path(run.results).read_text().splitlines())}


def test_randomized_kills_and_disk_faults_lose_and_duplicate_nothing(tmp_path, cpu_model, capsys):
    trials = int(os.environ.get("HPC_INFER_FAULT_TRIALS", "3"))
    seed = int(os.environ.get("HPC_INFER_FAULT_SEED", random.randrange(1 << 30)))
    prompts = [line for line in (ROOT / "hpc_infer/data_files/example_prompts.txt").read_text().splitlines() if line]
    totals = collections.Counter()
    log = []
    with capsys.disabled():  # first, so a run that fails or hangs can be replayed
        print(
            f"\nfault injection: seed {seed}, {trials} trials (replay: HPC_INFER_FAULT_SEED={seed} "
            f"HPC_INFER_FAULT_TRIALS={trials})",
            flush=True,
        )
    reference = _reference(tmp_path / "reference", prompts)
    for t in range(trials):
        rng = random.Random(seed + t)
        tmp = tmp_path / f"trial{t}"
        tmp.mkdir()
        data = _input(tmp, prompts)
        overrides = _overrides(tmp, data)
        rc = compose("cluster=local", *overrides)
        run, _ = prepare(rc, plan_input(rc), cpu_model, "")
        poison = f"r{rng.randrange(N_RECORDS)}" if rng.random() < 1 / 3 else None
        kill = _kill_victim(run, rng, tmp / "victim.log", poison)
        fault, damaged = _disk_fault(run, rng)
        relaunches, refused = _recover(overrides, damaged, REFUSAL.get(fault), poison)
        merge_kill = rng.random() < 0.5
        if merge_kill:  # kill a merge between writing the result and renaming it
            run.results().unlink()
            p = subprocess.run(
                [str(BIN / "hpc-infer"), "merge", str(run.root)],
                cwd=run.root.parent,
                env=dict(os.environ, HPC_INFER_FAULT="merge_tmp_written:KILL"),
                capture_output=True,
            )
            assert p.returncode == -signal.SIGKILL and not run.results().exists()
            merge(run)
        rows = [json.loads(line) for line in run.results().read_text().splitlines()]
        ids = collections.Counter(r["id"] for r in rows)
        lost = N_RECORDS - len(ids)
        duplicated = len(rows) - len(ids)
        failed = {r["id"] for r in rows if r.get("error")}
        reported = (
            poison is not None
            and failed == {poison}
            and next(r for r in rows if r["id"] == poison)["error"]["type"] == "engine_died"
        )
        totals.update(
            trials=1,
            lost=lost,
            duplicated=duplicated,
            killed="killed" in kill or "stopped" in kill,
            refused=refused,
            merge_killed=merge_kill,
            poison=poison is not None,
            poison_reported=reported,
        )
        assert failed == ({poison} if poison else set()) and (reported or not poison), failed
        assert all(r["output_tokens"] == MAX_TOKENS for r in rows if r["id"] not in failed)  # real, complete
        # refused (the damaged chunk named, seen above) or repaired: either way the result is
        # the undamaged run's, record for record (greedy)
        changed = sorted(r["id"] for r in rows if r["id"] not in failed and r["text"] != reference[r["id"]])
        assert not changed, f"trial {t}: records differ from the reference run: {changed}"
        log.append(
            f"trial {t}: kill {kill}; disk {fault} ({'refused' if refused else 'repaired'}); poison {poison}; "
            f"relaunches {relaunches}; merge killed "
            f"{merge_kill}; records {len(rows)}, lost {lost}, duplicated {duplicated}"
        )
    with capsys.disabled():
        print(f"\nfault injection (seed {seed}):\n  " + "\n  ".join(log))
        print(
            f"  trials {totals['trials']}, workers killed {totals['killed']}, damaged outputs refused (observed) "
            f"{totals['refused']}, merges killed {totals['merge_killed']}, poison records {totals['poison']} "
            f"(reported as errors {totals['poison_reported']}), records lost {totals['lost']}, "
            f"duplicated {totals['duplicated']}"
        )
    assert totals["lost"] == 0 and totals["duplicated"] == 0
    assert totals["killed"] >= 1  # the suite must actually kill something
