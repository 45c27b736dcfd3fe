"""Claims: one winner per chunk across processes, stale takeover by exactly one taker."""

import multiprocessing as mp
import os
import time

from hpc_infer.rundir import claims
from hpc_infer.rundir import RunDir, write_json


def _claim_all(root, wid, n, q):
    run = RunDir(root)
    owner = claims.Owner(wid, "h", os.getpid())
    q.put([c for c in range(n) if claims.try_claim(run, c, owner)])


def test_each_chunk_claimed_exactly_once_by_racing_processes(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    q = mp.Queue()
    procs = [mp.Process(target=_claim_all, args=(tmp_path, f"w{i}", 200, q)) for i in range(8)]
    for p in procs:
        p.start()
    won = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    flat = sorted(c for w in won for c in w)
    assert flat == list(range(200))


def _take(root, wid, q):
    run = RunDir(root)
    q.put(claims.take_over(run, 0, claims.Owner(wid, "h", os.getpid()), lease_s=60))


def test_stale_claim_taken_over_once(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    assert claims.try_claim(run, 0, claims.Owner("dead", "elsewhere", 1))
    old = time.time() - 1000
    os.utime(run.claim_path(0), (old, old))
    assert claims.is_stale(run.claim_path(0), lease_s=60)
    q = mp.Queue()
    procs = [mp.Process(target=_take, args=(tmp_path, f"t{i}", q)) for i in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(results) == 1
    assert claims.read_owner(run.claim_path(0)).worker_id.startswith("t")


def test_claim_of_dead_local_process_is_stale_at_once(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    p = mp.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()  # a pid that no longer exists
    import socket

    claims.try_claim(run, 3, claims.Owner("gone", socket.gethostname(), p.pid))
    assert claims.is_stale(run.claim_path(3), lease_s=3600)
    claims.try_claim(run, 4, claims.Owner("me", socket.gethostname(), os.getpid()))
    assert not claims.is_stale(run.claim_path(4), lease_s=3600)


def test_release_only_removes_own_claim(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    a, b = claims.Owner("a", "h", 1), claims.Owner("b", "h", 2)
    claims.try_claim(run, 0, a)
    claims.release(run, 0, b)
    assert run.claim_path(0).exists()
    claims.release(run, 0, a)
    assert not run.claim_path(0).exists()


def _beat(run, worker, records, elapsed, state="running", age=0.0, in_flight=None):
    now = time.time()
    write_json(run.heartbeat_path(worker), {"worker": worker, "state": state, "started": now - age - elapsed,
                                            "t": now - age, "records_done": records,
                                            "in_flight": in_flight or {}})


def test_pace_is_the_rate_over_the_sampled_median(tmp_path):
    from hpc_infer.rundir import claims as c

    run = RunDir(tmp_path)
    run.make()
    _beat(run, "me", 0, 100, in_flight={"3": 20})  # 0.2 records/s, counting records of chunks in flight
    for i in range(5):
        _beat(run, f"w{i}", 40 + 10 * i, 100)  # 0.4 .. 0.8 records/s: median 0.6
    p = c.pace(run, "me", fresh_s=30)
    assert p is not None and abs(p.ratio - 0.2 / 0.6) < 1e-3 and p.ratio < c.STRAGGLER and p.others_running
    for i in range(5):  # the others finished long ago: nobody would take the tail, so it is not left
        _beat(run, f"w{i}", 40 + 10 * i, 100, state="finished", age=600)
    assert not c.pace(run, "me", fresh_s=30).others_running
    _beat(run, "me", 90, 100)
    assert c.pace(run, "me", fresh_s=30).ratio == 1.0  # faster than the median: capped at a full share


def test_pace_unknown_until_another_worker_has_finished_a_record(tmp_path):
    from hpc_infer.rundir import claims as c

    run = RunDir(tmp_path)
    run.make()
    _beat(run, "me", 5, 10)
    assert c.pace(run, "me", fresh_s=30) is None  # alone
    _beat(run, "other", 0, 10, in_flight={"0": 3})
    assert c.pace(run, "me", fresh_s=30) is None  # the other has not finished one yet
    (run.heartbeats / "other.json").write_text("{half a file")  # being replaced: skipped, no crash
    assert c.pace(run, "me", fresh_s=30) is None
