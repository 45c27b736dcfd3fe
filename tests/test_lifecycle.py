"""The run's record of itself must be true: a kill is not a poison record, exactly one copy
of a chunk counts, progress is what finished, a time limit is a pause, not a failure.

Protocol tests drive workers with the deterministic FakeEngine (worker/fake_engine.py:
no vLLM, a known rate) through the real local Slurm where the scheduler matters; the
real-vLLM end-to-end tests live in test_vllm_runs.py, test_poison.py and the others.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import hold_env, read_results, release, require_slurm, run_launch, sh, user_env, wait_held
from hpc_infer.cluster.preflight import filesystem_type
from hpc_infer.rundir import RunDir, encode_chunk_output, isolate, jobs, read_json, write_json


def fake(**conf) -> dict:
    return {"HPC_INFER_FAKE_ENGINE": json.dumps(conf)}


def prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n" for i in range(n)))
    return path


def _wait(cond, what: str, timeout: float = 900):
    """Wait for a state (a bound for a broken run only: the test acts on the state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"never happened: {what}")


def _squeue_empty(job: str) -> bool:
    return not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()


# --- publishing: exactly one copy ------------------------------------------------------------


def _publish(root, q, marker):
    from hpc_infer.rundir import publish_chunk_output

    run = RunDir(Path(root))
    data = encode_chunk_output(0, [{"index": 0, "id": "a", "prompt_tokens": 1, "output_tokens": 1, "who": marker}])
    q.put(publish_chunk_output(run.fs, run.out_name(0), 0, data))


def test_two_finished_copies_publish_exactly_once(tmp_path):
    """Both copies of a chunk (a backup and its original) have their output written and are
    held there at a failpoint, then let go together, as real processes: one is published,
    the other is told it lost. This order alone passes a check-then-replace publish too;
    tests/test_publish_races.py runs every interleaving and shows that one fails."""
    run = RunDir(tmp_path / "run")
    run.make()
    hold = tmp_path / "hold"
    hold.mkdir()
    env = {"HPC_INFER_FAULT": "tmp_written@/out/:HOLD", "HPC_INFER_HOLD_DIR": str(hold)}
    q = mp.Queue()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        procs = [mp.Process(target=_publish, args=(str(run.root), q, m)) for m in ("first", "second")]
        for p in procs:
            p.start()
        _wait(lambda: len(list(hold.glob("held.*"))) == 2, "both copies written and held", 120)
        (hold / "release").touch()
        won = sorted(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert won == [False, True]
    assert run.chunk_done(0) and not [n for n in os.listdir(run.out) if n.startswith(".")]


# --- kills are not poison records ----------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_two_kills_then_a_relaunch_finds_no_suspect(tmp_path, slurm):
    """`hpc-infer cancel` and a raw `scancel` of a run while its two workers are mid-chunk,
    then a relaunch: no attempt counts as an engine death, nothing is run alone or bisected,
    the last launch starts one engine per worker, and every record is there once. While the
    workers ran, `status` never said a worker died."""
    require_slurm()
    data = prompts(tmp_path, 160)
    env = fake(step_s=0.05, max_num_seqs=4)
    args = (
        "cluster=slurm_local",
        "cluster.workers=2",
        f"data.path={data}",
        "sampling=greedy",
        "sampling.max_tokens=24",
        "cluster.heartbeat_s=1",
        "run_name=kills",
        "cluster.time=00:30:00",
    )
    root = tmp_path / "runs" / "kills"
    run = RunDir(root)

    def mid_run() -> bool:
        beats = [read_json(p) for p in run.heartbeats.glob("*.json")] if run.heartbeats.is_dir() else []
        live = [b for b in beats if b.get("state") == "running" and b.get("in_flight")]
        return len(live) >= 2

    for kill in ("hpc-infer cancel", "scancel"):
        run_launch(tmp_path, *args, "wait=false", env=env)
        _wait(mid_run, "both workers mid-chunk")
        status = sh(tmp_path, f"hpc-infer status {root}")
        assert status.returncode == 0 and "died" not in status.stdout, status.stdout
        ids = jobs.backend_and_ids(root)[1]
        array = ids[-1].split("_")[0]
        if kill == "scancel":
            subprocess.run(["scancel", array], check=True)
        else:
            p = sh(tmp_path, f"hpc-infer cancel {root}")
            assert p.returncode == 0, p.stderr
        _wait(lambda: _squeue_empty(array), "the cancelled jobs gone")
    assert not run.claimed_chunks() - run.done_chunks(), "a killed worker kept its claims"
    stopped = [read_json(p) for p in run.heartbeats.glob("*.json")]
    assert any(b.get("state") == "stopped" and "SIGTERM" in b.get("stopped_because", "") for b in stopped), stopped
    n_chunks = read_json(run.manifest)["n_chunks"]
    left = set(range(n_chunks)) - run.done_chunks()
    assert left and all(isolate.deaths(run, c) == 0 for c in left)  # cut mid-chunk, twice: no death counted
    assert not any(isolate.suspect(run, c, 1) for c in left)
    before = {p.name for p in run.heartbeats.glob("*.json")}
    p = run_launch(tmp_path, *args, env=env)
    assert "alone" not in p.stderr and "bisect" not in p.stderr, p.stderr
    last = [read_json(run.heartbeats / n) for n in {p.name for p in run.heartbeats.glob("*.json")} - before]
    assert len(last) == 2 and sum(1 for b in last if b.get("engine_start_s") is not None) == 2, last
    assert not any(b.get("isolating") is not None for b in last)
    assert not any(f.read_text().count('"alone": true') for f in (root / "attempts").rglob("*.json"))
    rows = read_results(root / "results.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(160)]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_rendered_script_requeues_itself_on_the_warning(tmp_path, slurm):
    """A task of `hpc-infer sbatch`'s script gets the scheduler's warning (SIGUSR2 to the batch
    shell, as --signal=B:USR2 sends it) mid-chunk: the worker releases, exits 75, the script
    requeues the task, which finishes the run; nothing counts as a death."""
    require_slurm()
    data = prompts(tmp_path, 40)
    env = dict(fake(step_s=0.05, max_num_seqs=4), **hold_env(tmp_path, "claimed@/00001"))
    p = sh(
        tmp_path,
        f"hpc-infer sbatch cluster=slurm_local cluster.workers=1 data.path={data} sampling=greedy "
        f"sampling.max_tokens=8 run_name=script cluster.heartbeat_s=1 output_root={tmp_path}/runs",
        env=user_env(env),
    )
    assert p.returncode == 0, p.stderr
    script = Path(p.stdout.strip().splitlines()[-1])
    text = script.read_text()
    assert "#SBATCH --signal=B:USR2@90" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    sub = subprocess.run(
        ["bash", "-c", f"sbatch --parsable {script}"], env=user_env(env), capture_output=True, text=True, cwd=tmp_path
    )
    assert sub.returncode == 0, sub.stderr
    array = sub.stdout.strip().split(";")[0]
    wait_held(tmp_path)  # chunk 0 in flight, chunk 1's claim taken: mid-run
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{array}_0"], check=True)
    time.sleep(1)  # the signal is queued for the worker before it moves on (the outcome does not depend on it)
    release(tmp_path)
    run = RunDir(script.parent)
    n_chunks = read_json(run.manifest)["n_chunks"]
    _wait(
        lambda: len(run.done_chunks()) == n_chunks and _squeue_empty(array), "the requeued task finishing the run", 1200
    )
    err = "".join(p.read_text(errors="replace") for p in run.logs.glob("*.err"))
    assert "requeued after the scheduler's warning" in err and "stopped by SIGUSR2" in err, err[-3000:]
    attempts = [read_json(f) for f in (run.root / "attempts").rglob("*.json")]
    assert any(a.get("released") and a["worker"] == f"{array}_0" for a in attempts), attempts  # taken back
    assert not any(a.get("alone") for a in attempts), attempts  # nothing was run alone
    p = sh(tmp_path, f"hpc-infer merge {run.root}")
    assert p.returncode == 0 and "40/40 records" in p.stdout, p.stdout + p.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_a_short_time_limit_is_a_pause_not_a_failure(tmp_path, slurm):
    """cluster.time=3 with a run longer than that: Slurm's own warning before the limit
    (cluster.signal_lead_s=50, sent 50-110 s before the end) reaches the workers (submitit requeues them), they release
    their chunks, and the run completes over two or more tasks each, every record once, no
    death counted."""
    require_slurm()
    data = prompts(tmp_path, 300)
    env = fake(step_s=0.25, max_num_seqs=2)  # 8 steps a record, 2 at a time: 1 record/s a worker, 150 s each
    p = run_launch(
        tmp_path,
        "cluster=slurm_local",
        "cluster.workers=2",
        f"data.path={data}",
        "sampling=greedy",
        "sampling.max_tokens=8",
        "cluster.heartbeat_s=1",
        "run_name=short",
        "chunks_per_worker=8",
        "cluster.time=3",
        "cluster.signal_lead_s=50",
        env=env,
        timeout=1800,
    )
    root = tmp_path / "runs" / "short"
    run = RunDir(root)
    out = "".join(p.read_text(errors="replace") for p in run.logs.glob("*.out"))
    assert "Caught signal SIGUSR2" in out and "Requeued job" in out, out[-3000:]  # Slurm's own warning, requeued
    attempts = [read_json(f) for f in (root / "attempts").rglob("*.json")]
    assert any(a.get("released") for a in attempts) and not any(a.get("alone") for a in attempts), attempts
    rows = read_results(root / "results.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(300)], p.stderr[-2000:]


def test_a_time_limit_with_no_room_is_refused_before_planning(tmp_path):
    require_slurm()  # the check runs after the controller answers (skip without Slurm; fail in CI)
    p = sh(tmp_path, f"hpc-infer launch cluster=slurm_local cluster.time=2 output_root={tmp_path}/runs")
    assert p.returncode == 2, p.stderr
    assert "cluster.time=2 (120 s)" in p.stderr and "Give at least cluster.time=00:05:00" in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()
    p = sh(
        tmp_path, f"hpc-infer sbatch cluster=slurm_local cluster.time=00:06:00 data.limit=2 output_root={tmp_path}/runs"
    )
    assert p.returncode == 0 and "warning: cluster.time=00:06:00" in p.stderr, p.stderr


# --- a worker that cannot reach the run directory ------------------------------------------


def test_a_worker_whose_heartbeat_fails_says_so_and_claims_nothing(tmp_path, monkeypatch, capfd):
    from conftest import compose
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.worker.worker import HeartbeatLost, run_worker

    rc = compose(
        f"output_root={tmp_path}/runs", "data=example", "cluster=local", "cluster.heartbeat_s=0.2", "cluster.lease_s=2"
    )
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    for k, v in dict(fake(step_s=0.001), HPC_INFER_FAULT="heartbeat:ERRNO_ESTALE").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(HeartbeatLost, match="no heartbeat reached"):  # not 'finished': it did nothing
        run_worker(run.root, "w")
    err = capfd.readouterr().err
    assert not run.claimed_chunks() and not run.done_chunks()
    assert err.count("heartbeat failed") == 1 and "ESTALE" in err and "no new chunk is claimed" in err, err
    monkeypatch.delenv("HPC_INFER_FAULT")
    run_worker(run.root, "w2")
    assert len(run.done_chunks()) == read_json(run.manifest)["n_chunks"]


# --- what a resume keeps ---------------------------------------------------------------------


def test_a_resume_keeps_every_worker_json_field(tmp_path, cpu_model):
    """Plan with every worker.json field away from its default (too_long=truncate with a
    record that needs it), then plan again as a relaunch does: worker.json is the same."""
    data = tmp_path / "in.jsonl"
    data.write_text(
        json.dumps({"id": "long", "prompt": "word " * 3000}) + "\n" + json.dumps({"id": "short", "prompt": "hi"}) + "\n"
    )
    line = (
        f"hpc-infer sbatch cluster=slurm_local data.path={data} data.too_long=truncate seed=7 "
        f"cluster.lease_s=77 cluster.heartbeat_s=3 cluster.max_chunks_in_flight=3 cluster.max_backups=0 "
        f"cluster.straggler_pacing=false cluster.max_attempts=3 permissions=umask cluster.env.X=1 "
        f"sampling.max_tokens=64 output_root={tmp_path}/runs"
    )
    p = sh(tmp_path, line)
    assert p.returncode == 0, p.stderr
    spec_path = Path(p.stdout.strip().splitlines()[-1]).parent / "worker.json"
    first = read_json(spec_path)
    assert first["too_long"] and all("keep" in v for v in first["too_long"].values()), first["too_long"]
    p = sh(tmp_path, line)
    assert p.returncode == 0 and "resuming" not in p.stdout, p.stderr
    assert read_json(spec_path) == first


# --- progress: one estimator -----------------------------------------------------------------


def test_progress_counts_what_finished_and_rates_the_live_window(tmp_path):
    """Two live workers at known rates (their `recent` samples), one dead worker of an earlier
    launch, tokens still generating: records and tokens done are exactly what finished, the
    rate is the live workers' recent one, ETA is records left / rate, and `status` prints
    those same numbers."""
    from conftest import compose
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.run.progress import describe, snapshot

    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    manifest = read_json(run.manifest)
    c0 = manifest["chunks"][0]
    from hpc_infer.rundir import read_chunk_records, write_atomic

    rows = [dict(r, text="t", outputs=[], prompt_tokens=1, output_tokens=5) for r in read_chunk_records(run, 0)]
    write_atomic(run.out_path(0), encode_chunk_output(0, rows, worker="a"))
    now = time.time()
    beats = {
        "a": {
            "state": "running",
            "records_done": c0["n_records"],
            "output_tokens": 5 * c0["n_records"],
            "in_flight": {"1": 2},
            "in_flight_tokens": 10,
            "generating_tokens": 999,
            "recent": [[100.0, 0, 0], [110.0, 4, 40]],
        },  # 0.4 records/s, 4 tok/s
        "b": {
            "state": "running",
            "records_done": 0,
            "output_tokens": 0,
            "in_flight": {"2": 1},
            "in_flight_tokens": 5,
            "recent": [[-50.0, 0, 0], [-40.0, 1, 10]],
        },  # 0.1 records/s, 1 tok/s
        "old": {"state": "running", "records_done": 0, "output_tokens": 0, "recent": [[0.0, 0, 0], [1.0, 90, 900]]},
    }
    for name, b in beats.items():
        write_json(run.heartbeat_path(name), dict(b, worker=name, started=now, t=now))
    old = run.heartbeat_path("old")
    os.utime(old, (now - 3600, now - 3600))  # an earlier launch's: not live
    p = snapshot(run, manifest, fresh_s=60)
    assert p.records_done == c0["n_records"] + 2 + 1
    assert p.output_tokens == 5 * c0["n_records"] + 10 + 5  # generating tokens are not done
    assert abs(p.records_per_s - 0.5) < 1e-9 and abs(p.tokens_per_s - 5.0) < 1e-9 and p.live_workers == 2
    assert abs(p.eta_s - (p.n_records - p.records_done) / 0.5) < 1e-9
    text = describe(run, {})
    assert f"records {p.records_done}/{p.n_records}" in text and "5 tok/s" in text and f"ETA {p.eta_s:,.0f}s" in text
    assert "died" not in text

    # engines that estimate their end (worker/finish.py): the records no engine has started,
    # at the rate, then the longest estimate of a live worker less the time since it was made
    a = json.loads(run.heartbeat_path("a").read_text())
    write_json(run.heartbeat_path("a"), dict(a, running=3, finish_s=40.0, finish_at=a["t"] - 5.0))
    b = json.loads(run.heartbeat_path("b").read_text())
    write_json(run.heartbeat_path("b"), dict(b, running=1, finish_s=20.0, finish_at=b["t"]))
    old_beat = json.loads(old.read_text())
    write_json(old, dict(old_beat, running=50, finish_s=900.0, finish_at=old_beat["t"]))  # not live: not counted
    os.utime(old, (now - 3600, now - 3600))
    p = snapshot(run, manifest, fresh_s=60)
    assert p.running == 4 and p.finish_s is not None and 33.0 < p.finish_s <= 35.0  # 40 - 5, less the beat's age
    left = p.n_records - p.records_done
    assert abs(p.eta_s - ((left - 4) / 0.5 + p.finish_s)) < 1e-9


# --- concurrent writers ----------------------------------------------------------------------


def _racer(root, barrier, q, kind):
    barrier.wait()
    if kind == "index":
        q.put(jobs.claim_index(Path(root), "serve"))
    else:
        jobs.add(Path(root), "slurm", "workers", [f"{os.getpid()}_0"])
        q.put(str(os.getpid()))


@pytest.mark.parametrize("kind", ["index", "record"])
def test_concurrent_scales_and_launches_lose_nothing(tmp_path, kind):
    """Eight processes at once (a barrier): replica numbers are all different; job records
    all kept (a read-modify-write of one jobs.json lost some)."""
    barrier, q = mp.Barrier(8), mp.Queue()
    procs = [mp.Process(target=_racer, args=(str(tmp_path), barrier, q, kind)) for _ in range(8)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    if kind == "index":
        assert sorted(got) == list(range(8))
    else:
        assert sorted(j.split("_")[0] for j in jobs.backend_and_ids(tmp_path)[1]) == sorted(got)


# --- the summary's figures -------------------------------------------------------------------


def test_summary_wall_time_is_per_launch_and_gpu_hours_are_the_runs(tmp_path):
    """Two launches a day apart: wall time is the two launches' spans on the launcher's clock,
    not a day; a standalone merge's GPU-hours use the run's own GPUs per worker."""
    from conftest import compose
    from hpc_infer.rundir import read_chunk_records, write_atomic
    from hpc_infer.run.merge import merge
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=slurm_local", "cluster.gpus_per_task=4")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    assert read_json(run.worker_spec)["gpus_per_worker"] == 4
    n = read_json(run.manifest)["n_chunks"]
    for cid in range(n):
        rows = [dict(r, text="t", outputs=[], prompt_tokens=1, output_tokens=10) for r in read_chunk_records(run, cid)]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0))
    jobs.add(run.root, "slurm", "launch", [], started=1000.0, ended=1100.0)
    jobs.add(run.root, "slurm", "launch", [], started=1000.0 + 86400, ended=1000.0 + 86400 + 60)
    write_json(run.heartbeat_path("w"), {"worker": "w", "started": 0.0, "t": 3600.0, "finished_at": 3600.0})
    s = merge(run)
    assert s.wall_s == 160.0 and [x["wall_s"] for x in s.launches] == [100.0, 60.0]
    assert s.output_tokens_per_s == round(s.output_tokens / 160.0, 2)
    assert s.gpu_hours == 4.0  # one worker-hour on 4 GPUs
    # a requeued task: its last process ran half an hour by its monotonic clock (ran_s; the
    # wall clock stepped back under it), its earlier ones an hour; before, the summary counted
    # the last process's wall-clock span alone (0 here)
    beat = {"worker": "w", "started": 5000.0, "t": 4000.0, "finished_at": 4000.0, "ran_s": 1800.0}
    write_json(run.heartbeat_path("w"), dict(beat, earlier_s=3600.0))
    assert merge(run).gpu_hours == 6.0


def test_a_run_directory_on_a_nodes_own_disk_is_refused_for_other_machines(tmp_path):
    """output_root on this machine's ext4/tmpfs while the Slurm nodes are other machines
    (scontrol says so: a shim here) is refused before planning; a one-machine Slurm (the
    local one) is fine."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text(
        "#!/bin/sh\ncase \"$1\" in ping) echo 'Slurmctld(primary) at x is UP';; "
        "show) echo 'NodeName=n1 NodeHostName=gpu-node-1 State=IDLE';; esac\n"
    )
    (shims / "scontrol").chmod(0o755)
    for tool in ("sbatch", "squeue", "srun"):
        (shims / tool).write_text("#!/bin/sh\nexit 0\n")
        (shims / tool).chmod(0o755)
    env = user_env()
    env["PATH"] = f"{shims}:{env['PATH']}"
    root = Path("/dev/shm") / f"hpc-infer-test-{os.getpid()}-{tmp_path.name}"  # tmpfs on every Linux
    assert filesystem_type(root) == "tmpfs"
    p = sh(tmp_path, f"hpc-infer launch cluster=slurm_local output_root={root}/runs", env=env)
    assert p.returncode == 2 and "own tmpfs file system" in p.stderr and "gpu-node-1" in p.stderr, p.stderr
    assert "output_root=$SCRATCH/runs" in p.stderr and not root.exists()


# --- the idle workers' notices ---------------------------------------------------------------


def test_a_damaged_output_is_redone_after_the_run_said_done(tmp_path):
    """The last worker of a finished run posts `claims/notices/done` (idle workers then end
    without listing the run). An output damaged afterwards is set aside by the next launch
    and redone, and the merge has every record once. (The launch also clears the old
    `done`; here its one worker claims the chunk before it ever reads notices, so this test
    passes without that clear too: tests/test_claims.py checks what the clear changes, an
    idle worker waiting for a chunk not done instead of ending.)"""
    data = prompts(tmp_path, 24)
    args = ("cluster=local", "cluster.workers=2", f"data.path={data}", "sampling.max_tokens=3", "run_name=d")
    run_launch(tmp_path, *args, env=fake(step_s=0.001, max_num_seqs=4), timeout=300)
    run = RunDir(tmp_path / "runs" / "d")
    assert (run.root / "claims" / "notices" / "done").exists(), "the last worker did not post done"
    victim = sorted(run.out.glob("*.jsonl"))[1]
    victim.write_bytes(victim.read_bytes()[:-20])  # cut: no valid trailer
    p = run_launch(tmp_path, *args, env=fake(step_s=0.001, max_num_seqs=4), timeout=300)
    assert "damaged" in p.stderr, p.stderr[-2000:]
    assert [r["id"] for r in read_results(run.root / "results.jsonl")] == [f"r{i}" for i in range(24)]
    assert run.chunk_done(int(victim.name[:5]))
