"""Concurrency tests that prove the overlap happened: the first process is held inside its
critical section (the `locked` failpoint: rundir/lease.Lock just acquired), the others are
seen waiting for it (their own words, printed when they find the lock held), and only
then is the first let go. Without the lock, the others would not wait and these fail."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import compose, hold_env, release, user_env, wait_held
from test_cache_admin import source  # noqa: F401  (the fixture: a small real model directory)
from test_hub_download import _env, hub  # noqa: F401  (the fixture: the hub's HTTP API stand-in)

WAITING_BOUND_S = 600  # a bound for a broken lock only: each wait ends on what the processes say


def _said(procs_logs: list[Path], words: str) -> bool:
    return all(words in log.read_text(errors="replace") for log in procs_logs)


def _wait_for(cond, what: str) -> None:
    deadline = time.time() + WAITING_BOUND_S
    while not cond():
        assert time.time() < deadline, f"never: {what}"
        time.sleep(0.2)


def _start(cmd: list[str] | str, log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    shell = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    return subprocess.Popen(shell, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finished_run(tmp_path: Path):
    from hpc_infer.rundir import encode_chunk_output, read_chunk_records, read_json, write_atomic
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = [dict(r, text="t", outputs=[], prompt_tokens=1, output_tokens=1) for r in read_chunk_records(run, cid)]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0))
    return run


def test_a_second_merge_waits_for_the_first(tmp_path):
    run = _finished_run(tmp_path)
    first = _start(
        f"exec hpc-infer merge {run.root}",
        tmp_path / "a.log",
        user_env(hold_env(tmp_path, "locked@.merge.lock")),
        tmp_path,
    )
    wait_held(tmp_path)  # the first holds the merge lock
    second = _start(f"exec hpc-infer merge {run.root}", tmp_path / "b.log", user_env(), tmp_path)
    _wait_for(lambda: _said([tmp_path / "b.log"], "another merge into"), "the second merge waiting")
    assert second.poll() is None and not (run.root / "summary.json").exists()
    release(tmp_path)
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()
    rows = [json.loads(line) for line in (run.root / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(16))


def test_concurrent_stagers_wait_and_copy_once(tmp_path, source):  # noqa: F811 (the imported fixture)
    root = tmp_path / "shared"
    env = user_env(hold_env(tmp_path, "locked@.Tiny-Model.lock"))
    cmd = f"exec hpc-infer cache stage {source} --root {root} --hf-id org/Tiny-Model"
    procs = [_start(cmd, tmp_path / f"s{i}.log", env, tmp_path) for i in range(4)]
    wait_held(tmp_path)  # one holds the model's lock
    logs = [tmp_path / f"s{i}.log" for i in range(4)]
    _wait_for(
        lambda: sum("another stage of Tiny-Model" in log.read_text() for log in logs) == 3, "the three others waiting"
    )
    assert all(p.poll() is None for p in procs) and not (root / "Tiny-Model").exists()
    release(tmp_path)
    assert all(p.wait(timeout=300) == 0 for p in procs), [log.read_text()[-1000:] for log in logs]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["Tiny-Model"]


def test_concurrent_launches_wait_for_one_download(tmp_path, hub):  # noqa: F811 (the imported fixture)
    """Four `hpc-infer sbatch` at once for a hub model: one downloads (held inside the lock),
    the three others say they wait, then all point at the one copy; the hub served each file
    once."""
    shared = tmp_path / "shared-hf"
    env = user_env(dict(_env(hub, tmp_path), **hold_env(tmp_path, "locked@.hpc_infer-org--tiny.lock")))
    logs = [tmp_path / f"l{i}.log" for i in range(4)]
    procs = [
        _start(
            f"exec hpc-infer sbatch model=opt_125m model.hf_id=org/tiny cluster=slurm_local "
            f"cluster.hf_home={shared} data.limit=1 run_name=r{i} output_root={tmp_path}/runs",
            logs[i],
            env,
            tmp_path,
        )
        for i in range(4)
    ]
    wait_held(tmp_path)
    _wait_for(
        lambda: sum("another launch is downloading org/tiny" in log.read_text() for log in logs) == 3,
        "the three others waiting",
    )
    assert hub.downloads == []  # the holder has not downloaded yet: it is held right after taking the lock
    release(tmp_path)
    assert all(p.wait(timeout=600) == 0 for p in procs), [log.read_text()[-2000:] for log in logs]
    assert sorted(hub.downloads) == ["org/tiny/config.json", "org/tiny/model.safetensors"]  # once each
