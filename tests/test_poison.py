"""Poison records: a record that kills the engine's process is found by bisection and
becomes that record's error; the rest of its chunk, and the run, complete.

The bisection plan is checked against a simulated engine on many chunk sizes and poison
sets (fast); then a real worker is killed by a failpoint on a chosen record id: in this
process (the failpoint raises, as vLLM does when its engine core dies) and as real
worker processes killed with SIGKILL through the local backend, resubmitted by launch.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest

from conftest import compose

from hpc_infer.rundir import isolate


def _simulate(n: int, poison: set[int], max_attempts: int, flaky: float = 0.0, rng=None):
    """Run isolate.next_step to the end against an engine that dies whenever a range holds a
    poison record (and, with `flaky`, at random). Returns (deaths, records found poison)."""
    tried: collections.Counter = collections.Counter()  # tries alone; the max_attempts shared ones died
    done: set = set()
    found, deaths = set(), max_attempts
    for _ in range(10_000):
        step = isolate.next_step((0, n), tried, done, max_attempts)
        if step is None:
            return deaths, found
        what, (lo, hi) = step
        if what == "poison":
            found.add(lo)
            done.add((lo, hi))
            continue
        tried[(lo, hi)] += 1
        if poison & set(range(lo, hi)) or (rng and rng.random() < flaky):
            deaths += 1
        else:
            done.add((lo, hi))
    raise AssertionError("the bisection did not end")


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_bisection_finds_exactly_the_poison_records(max_attempts):
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 300)
        poison = set(rng.sample(range(n), rng.randint(1, min(n, 4))))
        deaths, found = _simulate(n, poison, max_attempts)
        assert found == poison
        if len(poison) == 1:  # the documented cost: 2 x max_attempts + ceil(log2 n) at most
            assert deaths <= 2 * max_attempts + (n - 1).bit_length(), (n, poison, deaths)


def test_bisection_with_unrelated_deaths_never_blames_a_good_record_twice_alone():
    """Deaths that are not the record's fault (a preemption) slow the search; with
    max_attempts=2 a good record is blamed only if it is killed alone twice by chance."""
    rng = random.Random(11)
    wrongly = 0
    for _ in range(300):
        n = rng.randint(2, 64)
        poison = {rng.randrange(n)}
        _, found = _simulate(n, poison, 2, flaky=0.05, rng=rng)
        assert poison <= found
        wrongly += len(found - poison)
    assert wrongly <= 3  # 300 chunks, 5% random deaths: a handful at most


def test_parts_and_attempts_survive_on_disk(tmp_path):
    from hpc_infer.rundir import RunDir

    run = RunDir(tmp_path)
    run.make()
    isolate.record_attempt(run, 3, (0, 8), "w1", alone=False)
    isolate.record_attempt(run, 3, (0, 8), "w2", alone=False)
    isolate.record_attempt(run, 3, (4, 8), "w2", alone=True)
    (run.root / isolate.attempts_path(3) / "99-torn.json").write_bytes(b'{"range": [0, ')  # damaged: skipped
    assert isolate.attempts(run, 3) == (2, {(4, 8): 1})
    assert isolate.attempts(run, 3, exclude=["w2"]) == (1, {})  # the live holder's attempt is not a death
    from hpc_infer.rundir import jobs

    jobs.add(run.root, "slurm", "cancelled", ["w1"])  # `hpc-infer cancel` ended w1: its attempt is no death
    assert isolate.attempts(run, 3) == (1, {(4, 8): 1})
    assert isolate.suspect(run, 3, 1) and not isolate.suspect(run, 3, 2) and not isolate.suspect(run, 4, 1)
    isolate.save_part(run, 3, (4, 8), [{"index": 4}])
    isolate.save_part(run, 3, (0, 4), [{"index": 0}])
    assert [r["index"] for r in isolate.read_parts(run, 3)] == [0, 4]
    isolate.record_attempt(run, 5, (0, 2), "w4", alone=False)
    isolate.record_attempt(run, 5, (0, 2), "w4", alone=False, released=True)  # a cancel, not a death
    assert isolate.attempts(run, 5) == (0, {}) and not isolate.suspect(run, 5, 1)
    before = isolate.run_marker(run)
    isolate.record_attempt(run, 3, (0, 4), "w3", alone=True)
    assert isolate.run_marker(run) != before
    isolate.forget(run, 3)
    assert isolate.done_parts(run, 3) == {}


def _rows(n, prefix):
    return [{"id": f"{prefix}{i}", "prompt": f"Count to {i + 2}:"} for i in range(n)]


def _check_results(run_root: Path, ids: list[str], poison: set[str]) -> dict:
    rows = [json.loads(line) for line in (run_root / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ids)  # every record exactly once
    for r in rows:
        if r["id"] in poison:
            assert r["error"]["type"] == "engine_died" and "died each time" in r["error"]["message"], r
        else:
            assert not r.get("error") and r["output_tokens"] == 3, r  # real generations
    errors = [json.loads(line) for line in (run_root / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == poison and all(e["_hpc_infer_error"]["line"] for e in errors)
    return json.loads((run_root / "summary.json").read_text())


@pytest.mark.slow
def test_poison_record_raising_in_process_is_isolated_across_relaunches(tmp_path, monkeypatch):
    """The failpoint raises (what vLLM does when its engine core process dies) in a worker
    running in this process; the user relaunches; state on disk carries the search on."""
    from hpc_infer.launch import launch

    rows = _rows(10, "p")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HPC_INFER_FAULT", "record@p6:RAISE")
    overrides = [
        "cluster=debug",
        f"data.path={data}",
        f"output_root={tmp_path / 'runs'}",
        "run_name=r",
        "chunks_per_worker=2",
        "sampling=greedy",
        "sampling.max_tokens=3",
        "sampling.ignore_eos=true",
    ]
    deaths = 0
    for _ in range(10):
        try:
            launch(compose(*overrides), "")
            break
        except RuntimeError as e:
            assert "injected fault at record" in str(e)
            deaths += 1
            if deaths == 1:  # what the user sees between relaunches
                import subprocess

                from conftest import user_env

                st = subprocess.run(
                    ["bash", "-c", f"hpc-infer status {tmp_path / 'runs' / 'r'}"],
                    env=user_env(),
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert st.returncode == 0 and "workers died with these chunks in their batch" in st.stdout, st
    run_root = tmp_path / "runs" / "r"
    summary = _check_results(run_root, [r["id"] for r in rows], {"p6"})
    assert summary["error_types"] == {"engine_died": 1}
    # two normal attempts, then halving 5 records down to one (3 levels at most), one more alone
    assert 2 < deaths <= 2 + 3 + 1, deaths
    assert not (run_root / "parts").exists() or not any((run_root / "parts").iterdir())


@pytest.mark.slow
def test_poison_record_killing_worker_processes_is_isolated_by_resubmission(tmp_path, cpu_model):
    """Real worker processes (local backend) die by SIGKILL whenever the poison record enters
    their engine; launch resubmits while each round gets further; the chunk the poison record
    shared a batch with completes in isolation too. One `hpc-infer launch`, as a user types it."""
    import subprocess

    from conftest import BIN, user_env

    rows = _rows(2, "a") + _rows(2, "b")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(user_env(), HPC_INFER_FAULT="record@b1:KILL")
    p = subprocess.run(
        [
            str(BIN / "hpc-infer"),
            "launch",
            "cluster=local",
            "cluster.workers=1",
            "cluster.max_attempts=1",
            f"data.path={data}",
            f"output_root={tmp_path / 'runs'}",
            "run_name=r",
            "chunks_per_worker=2",
            "sampling=greedy",
            "sampling.max_tokens=3",
            "sampling.ignore_eos=true",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # 4 records in 3 chunks, all in the first worker's batch: it dies, then each chunk runs alone:
    # [a0 a1] in halves, [b0] alone, [b1] alone dies (max_attempts=1): 3 worker processes in all
    assert p.stderr.count("submitting again") == 2, p.stderr[-3000:]
    run_root = tmp_path / "runs" / "r"
    summary = _check_results(run_root, [r["id"] for r in rows], {"b1"})
    assert summary["errors"] == 1
