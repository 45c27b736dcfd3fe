"""The run directory on a shared file system: two client mounts with their own caches, one
node's clock five minutes ahead, flock useless across clients (tests/sharedfs.py).

Workers are real worker processes with the FakeEngine; leases, takeovers, publishing and
the merge lock are the real protocol. What must hold there: no record lost or duplicated,
no lease stolen from a live worker, no `flock` anywhere (ENOSYS, or per-client locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose, read_results, require_slurm, run_launch, wait_held, hold_env, release
from hpc_infer.rundir import RunDir, read_json
from sharedfs import SharedFS, available

pytestmark = pytest.mark.usefixtures("as_root")  # mounts and namespaces: root (CI: a failure, never a skip)
FAKE = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.01, "max_num_seqs": 4})}


@pytest.fixture
def fs():
    why = available()
    if why:
        if os.environ.get("HPC_INFER_REQUIRE_SLURM"):  # in CI a missing part is a failure
            pytest.fail(f"the shared-file-system stand-in cannot run: {why}")
        pytest.skip(why)
    f = SharedFS(skew_s=300)
    yield f
    f.close()


def _plan(root: Path, *overrides: str) -> RunDir:
    from hpc_infer.run.plan import plan_input, prepare

    data = root.parent / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"q{i}"}) + "\n" for i in range(48)))
    rc = compose(
        f"output_root={root}",
        f"data.path={data}",
        "cluster=local",
        "sampling=greedy",
        "sampling.max_tokens=6",
        "max_chunk_records=4",
        "cluster.heartbeat_s=1",
        *overrides,
    )
    run, _ = prepare(rc, plan_input(rc), "/model/not/loaded", "")
    return run


def _worker(fs: SharedFS, node: str, run: RunDir, wid: str, log: Path, **env) -> subprocess.Popen:
    argv = fs.on(node, [sys.executable, "-m", "hpc_infer.worker", str(run.root), "--worker-id", wid])
    return subprocess.Popen(
        argv,
        env={**os.environ, **FAKE, **env},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
    )


def _ids(run: RunDir) -> list[str]:
    from hpc_infer.run.merge import merge

    return [r["id"] for r in read_results(Path(merge(run).results))]


def test_the_stand_in_is_what_it_claims(fs):
    """Client caches: a file made through mount A can stay invisible through mount B; flock
    through A does not exclude through B; node2's clock is minutes ahead of the server's."""
    (fs.b / "probe").exists()  # a negative entry now cached on B
    (fs.a / "probe").write_text("x")
    seen_late = not (fs.b / "probe").exists()
    with open(fs.a / "lock", "w") as a, open(fs.b / "lock", "w") as b:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)  # both "hold" it: flock is per client here
    clock = f"{fs.a}/clock"  # written by node2 now: its mtime is the server's time, time.time() node2's
    skew = subprocess.run(
        fs.on(
            "node2",
            [
                sys.executable,
                "-c",
                f"import os, time; open('{clock}', 'w').close(); print(time.time() - os.stat('{clock}').st_mtime)",
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert seen_late and float(skew) > 250, (seen_late, skew)
    from hpc_infer.rundir.lease import Lock

    first = Lock(fs.a / "ours.lock", lease_s=60)
    first.acquire()
    p = subprocess.run(
        fs.on(
            "node2",
            [
                sys.executable,
                "-c",
                f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from hpc_infer.rundir.lease import Lock
l = Lock('{fs.a}/ours.lock', lease_s=60, poll_s=0.1)
print(l._try() or l._stale() is not None)""",
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    first.release()
    assert p.stdout.strip() == "False", p.stdout + p.stderr  # ours excludes across clients, skewed clock or not


def test_a_skewed_node_never_takes_a_live_workers_lease(fs, tmp_path):
    """A worker on node1 holds chunks (held at its first engine step); a worker on node2, its
    clock five minutes ahead and a lease of 60 s, runs everything else and takes none of
    those: the holder is alive by the file server's clock. Then both finish, every record once."""
    run = _plan(fs.a / "runs", "cluster.lease_s=60", "cluster.max_backups=0", "cluster.max_chunks_in_flight=2")
    one = _worker(fs, "node1", run, "n1", tmp_path / "n1.log", **hold_env(tmp_path, "step"))
    try:
        _lease_kept(fs, run, one, tmp_path)
    finally:
        release(tmp_path)
        one.kill()


def _lease_kept(fs: SharedFS, run: RunDir, one: subprocess.Popen, tmp_path: Path) -> None:
    wait_held(tmp_path)
    deadline = time.time() + 120  # its next beat says what it holds (a bound for a broken worker only)
    while time.time() < deadline and not read_json(run.heartbeat_path("n1")).get("held"):
        time.sleep(0.2)
    held = {int(c) for c in read_json(run.heartbeat_path("n1"))["held"]}
    two = _worker(fs, "node2", run, "n2", tmp_path / "n2.log")
    try:
        others = set(range(read_json(run.manifest)["n_chunks"])) - held
        deadline = time.time() + 600  # n2 runs every other chunk, then waits for the live holder (it never
        while time.time() < deadline and not others <= run.done_chunks():  # leaves a chunk behind: idle_wait)
            assert two.poll() is None, (tmp_path / "n2.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # n2 idle a while beside the live holder: it must not take the held chunks
        taken = [
            f
            for f in (run.root / "attempts").rglob("*.json")
            if read_json(f)["worker"] == "n2" and int(f.parent.name) in held
        ]
        assert held and taken == [], taken
        assert all(read_json(run.claim_path(c))["worker"] == "n1" for c in held)
        release(tmp_path)
        assert one.wait(timeout=600) == 0, (tmp_path / "n1.log").read_text()[-3000:]
        assert two.wait(timeout=600) == 0, (tmp_path / "n2.log").read_text()[-3000:]  # all done: it ends
        assert _ids(run) == [f"r{i}" for i in range(48)]
    finally:
        if two.poll() is None:
            two.kill()
            two.wait()


def _until_stale(run: RunDir, lease_s: float) -> None:
    """Wait for a state, not a time: every claim left is stale by the file server's clock
    (the deadline only bounds a broken run; a passing one never reaches it)."""
    from hpc_infer.rundir import claims

    deadline = time.time() + 300
    while time.time() < deadline and not all(claims.is_stale(run, c, lease_s) for c in run.claimed_chunks()):
        time.sleep(0.2)


POINTS = ["claimed", "tmp_written@/out/", "renamed@/out/", "step", "renamed@/heartbeats/", "tmp_written@/attempts/"]


def test_fault_trials_through_two_mounts(fs, tmp_path):
    """Randomized trials: a worker on the skewed node2 killed with SIGKILL at a failpoint of
    the protocol (it must die there: each trial asserts its fault took effect), sometimes a
    file damaged or a claim removed, then workers on node1 finish the run once the dead
    worker's lease ran out. Every trial ends with every record exactly once."""
    seed = int(os.environ.get("HPC_INFER_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"shared-fs fault trials: seed {seed}")
    for trial in range(int(os.environ.get("HPC_INFER_SHAREDFS_TRIALS", 6))):
        run = _plan(fs.a / f"t{trial}", "cluster.lease_s=4", "cluster.max_chunks_in_flight=2")
        point, nth = rng.choice(POINTS), rng.randint(1, 3)
        victim = _worker(
            fs,
            "node2",
            run,
            "victim",
            tmp_path / f"v{trial}.log",
            HPC_INFER_FAULT=f"{point}:KILL:{nth}",
            HPC_INFER_FAKE_ENGINE=json.dumps({"step_s": 0.1, "max_num_seqs": 4}),
        )  # lives for beats
        rc = victim.wait(timeout=600)
        assert rc == -signal.SIGKILL, f"trial {trial} ({point}:{nth}): the fault was not reached (exit {rc})"
        damage = rng.choice(["none", "stray_tmp", "remove_claim"])
        if damage == "stray_tmp":
            (run.out / ".00000.jsonl.x1y2.tmp").write_bytes(b'{"half": ')
        elif damage == "remove_claim" and run.claimed_chunks():
            run.claim_path(sorted(run.claimed_chunks())[0]).unlink()
        _until_stale(run, lease_s=4)  # the dead worker's lease runs out, by the file server's clock
        for k in range(3):
            w = _worker(fs, "node1", run, f"r{trial}-{k}", tmp_path / f"r{trial}-{k}.log")
            assert w.wait(timeout=600) == 0, (tmp_path / f"r{trial}-{k}.log").read_text()[-3000:]
            if len(run.done_chunks()) == read_json(run.manifest)["n_chunks"]:
                break
        ids = _ids(run)
        assert ids == [f"r{i}" for i in range(48)], (trial, point, nth, damage, seed)
        alone = [f for f in (run.root / "attempts").rglob("*.json") if read_json(f).get("alone")]
        assert alone == [], (trial, point)  # one death is no poison suspect: nothing was run alone


@pytest.mark.slurm
@pytest.mark.slow
def test_a_run_on_both_slurm_nodes_through_their_own_mounts(fs, tmp_path, slurm):
    """The local Slurm's two nodes each run a worker (2 CPUs a task: one a node); node2's
    jobs see the run through mount B with their clock five minutes ahead. The launch
    completes with every record once, and node2's worker did part of it."""
    require_slurm()
    p = run_launch(
        tmp_path,
        "cluster=slurm_local",
        "cluster.workers=2",
        "cluster.cpus_per_task=2",
        f"cluster.python={fs.wrapper} {sys.executable}",
        "data=example",
        "sampling=greedy",
        "sampling.max_tokens=8",
        "cluster.heartbeat_s=1",
        "cluster.lease_s=20",
        "max_chunk_records=2",
        f"output_root={fs.a}/runs",
        env={**FAKE, "HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.2, "max_num_seqs": 2})},
    )
    assert p.returncode == 0 and (fs.a / "runs").is_dir(), (p.stdout[-2000:], p.stderr[-3000:])
    run = RunDir(next((fs.a / "runs").iterdir()))
    rows = read_results(run.results())
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16, p.stderr[-2000:]
    beats = [read_json(b) for b in run.heartbeats.glob("*.json")]
    skewed = [
        b
        for b in beats
        if b.get("recent") and b["recent"][-1][0] - os.stat(run.heartbeat_path(b["worker"])).st_mtime > 200
    ]
    assert skewed and all(b["chunks_done"] > 0 for b in beats), beats
