"""Claims: one winner per chunk across processes, stale takeover by exactly one taker."""

import multiprocessing as mp
import json
import os
import time
from pathlib import Path

import pytest

from hpc_infer.rundir import claimer, claims, notices, tail
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
    assert claims.is_stale(run, 0, lease_s=60)
    q = mp.Queue()
    procs = [mp.Process(target=_take, args=(tmp_path, f"t{i}", q)) for i in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(results) == 1
    assert claims.read_owner(run.fs, run.claim_name(0)).worker_id.startswith("t")


def test_claim_of_dead_local_process_is_stale_at_once(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    p = mp.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()  # a pid that no longer exists
    import socket

    claims.try_claim(run, 3, claims.Owner("gone", socket.gethostname(), p.pid))
    assert claims.is_stale(run, 3, lease_s=3600)
    claims.try_claim(run, 4, claims.Owner("me", socket.gethostname(), os.getpid()))
    assert not claims.is_stale(run, 4, lease_s=3600)


def test_release_only_removes_own_claim(tmp_path):
    run = RunDir(tmp_path)
    run.make()
    a, b = claims.Owner("a", "h", 1), claims.Owner("b", "h", 2)
    claims.try_claim(run, 0, a)
    claims.release(run, 0, b)
    assert run.claim_path(0).exists()
    claims.release(run, 0, a)
    assert not run.claim_path(0).exists()


def _beat(run, worker, records, window_s, state="running", age=0.0, start_t=1000.0):
    """A heartbeat whose recent window shows `records` finished over `window_s` seconds (on
    the worker's own clock, which may be anything: only differences count), written
    `age` seconds ago by the file server's clock."""
    recent = [[start_t, 0, 0], [start_t + window_s, records, 10 * records]]
    write_json(
        run.heartbeat_path(worker),
        {
            "worker": worker,
            "state": state,
            "recent": recent,
            "t": start_t + window_s,
            "records_done": records,
            "in_flight": {},
        },
    )
    now = time.time()
    os.utime(run.heartbeat_path(worker), (now - age, now - age))


def test_pace_is_the_recent_rate_over_the_live_median(tmp_path):
    from hpc_infer.rundir import tail as c

    run = RunDir(tmp_path)
    run.make()
    _beat(run, "me", 20, 100, start_t=-5e6)  # 0.2 records/s; a clock far off changes nothing
    for i in range(5):
        _beat(run, f"w{i}", 40 + 10 * i, 100)  # 0.4 .. 0.8 records/s: median 0.6
    p = c.pace(run, "me", fresh_s=30)
    assert p is not None and abs(p.ratio - 0.2 / 0.6) < 1e-3 and p.ratio < c.STRAGGLER and p.others_running
    for i in range(5):  # the others' beats are old (dead, or an earlier launch's): they do not count
        _beat(run, f"w{i}", 40 + 10 * i, 100, age=600)
    assert c.pace(run, "me", fresh_s=30) is None
    for i in range(5):  # live but finished: not running, not counted either
        _beat(run, f"w{i}", 40 + 10 * i, 100, state="finished")
    assert c.pace(run, "me", fresh_s=30) is None
    _beat(run, "w0", 60, 100)
    _beat(run, "me", 90, 100)
    assert c.pace(run, "me", fresh_s=30).ratio == 1.0  # faster than the median: capped at a full share


def test_pace_unknown_until_another_worker_has_a_rate(tmp_path):
    from hpc_infer.rundir import tail as c

    run = RunDir(tmp_path)
    run.make()
    _beat(run, "me", 5, 10)
    assert c.pace(run, "me", fresh_s=30) is None  # alone
    _beat(run, "other", 0, 10)
    assert c.pace(run, "me", fresh_s=30) is None  # the other has not finished one yet
    (run.heartbeats / "other.json").write_text("{half a file")  # being replaced: skipped, no crash
    assert c.pace(run, "me", fresh_s=30) is None


def test_a_claim_lives_as_long_as_its_holders_heartbeat(tmp_path):
    """Claims are never refreshed: a claim is live while its holder's heartbeat is (by the
    file server's clock), and stale once that beat is older than the lease, names another
    process (a requeued task has its job's id), or says the worker ended."""
    import socket

    run = RunDir(tmp_path)
    run.make()
    me = claims.Owner("w", socket.gethostname(), os.getpid())
    claims.try_claim(run, 0, me)
    old = time.time() - 1000
    os.utime(run.claim_path(0), (old, old))  # the claim file itself is old: it does not matter
    write_json(run.heartbeat_path("w"), {"worker": "w", "host": me.host, "pid": me.pid, "state": "running"})
    assert not claims.is_stale(run, 0, lease_s=60)
    os.utime(run.heartbeat_path("w"), (old, old))
    assert claims.is_stale(run, 0, lease_s=60)
    write_json(run.heartbeat_path("w"), {"worker": "w", "host": me.host, "pid": me.pid + 1, "state": "running"})
    assert claims.is_stale(run, 0, lease_s=60)  # the same worker id, another process
    write_json(run.heartbeat_path("w"), {"worker": "w", "host": me.host, "pid": me.pid, "state": "stopped"})
    assert claims.is_stale(run, 0, lease_s=60)


def test_two_takers_of_a_dead_holders_lock_never_both_hold_it(tmp_path):
    """Both judged the dead holder's lock stale; the first took it over and holds a fresh
    one. The second, acting on its earlier look, must not remove that fresh lock (the old
    takeover renamed away whatever was there, and both proceeded)."""
    import json as _json
    import time as _time

    from hpc_infer.rundir.lease import Lock

    path = tmp_path / "merge.lock"
    path.write_text(_json.dumps({"host": "elsewhere", "pid": 1, "token": "dead"}))
    old = _time.time() - 1000
    os.utime(path, (old, old))
    a, b = Lock(path, lease_s=60), Lock(path, lease_s=60)
    judged = b._stale()  # b looks first
    assert judged and judged["token"] == "dead"
    a.acquire()  # a takes it over first
    try:
        assert not b._take_over(judged)  # b's look is out of date: it takes nothing
        assert _json.loads(path.read_text())["token"] == a.owner["token"]
        assert not list(tmp_path.glob("merge.lock.taking-*"))
    finally:
        a.release()


def test_status_counts_a_backup_copys_attempt_as_no_death_and_a_killed_worker_as_lost(tmp_path):
    """`hpc-infer status` (progress.describe) on a run where chunk 0's holder and a live
    backup copy of it both recorded an attempt, and a third worker whose last beat said
    "running" was killed outright: one death (the killed one's), not three, and the killed
    worker is shown lost, not running."""
    import json
    import subprocess
    import sys

    from conftest import compose
    from hpc_infer.host.procs import identify, this_process
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.run.progress import describe
    from hpc_infer.rundir import isolate

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"q {i}"}) + "\n" for i in range(8)))
    rc = compose(f"output_root={tmp_path}/runs", f"data.path={data}", "cluster=local", "cluster.workers=2")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_start = identify(dead.pid).start if identify(dead.pid) else 1
    dead.wait()
    me = this_process()
    for wid, pid, start in (
        ("holder", me.pid, me.start),
        ("backup", me.pid, me.start),
        ("killed", dead.pid, dead_start),
    ):
        beat = {"worker": wid, "host": claims.socket.gethostname(), "pid": pid, "pid_start": start}
        beat.update(state="running", t=time.time(), started=time.time(), in_flight={"0": 1}, chunks_done=0)
        run.fs.replace(run.heartbeat_name(wid), json.dumps(beat).encode())
        isolate.record_attempt(run, 0, (0, 1), wid, alone=False)
    assert claims.try_claim(run, 0, claims.Owner("holder", claims.socket.gethostname(), me.pid))
    text = describe(run, {})
    assert "workers died with these chunks in their batch: 0 (1x)" in text, text
    killed = next(line for line in text.splitlines() if "worker" in line and "killed" in line)
    assert " lost " in killed and "its process is gone" in killed, killed
    backup = next(line for line in text.splitlines() if "worker" in line and "backup" in line)
    assert " running " in backup and "not running" not in backup, backup


def test_a_lock_never_acts_through_a_link_in_its_place(tmp_path):
    """A link where the lock file is (planted before the lock is taken, and swapped in while
    it is held): no step of the lock reads the target's age, touches its mtime, or writes
    it. O_EXCL alone only covers the create; the age, the refresh and the server-clock
    probe are the steps that would follow a link (the old test checked the create only)."""
    import time as _time

    from hpc_infer.rundir.fsio import PinnedDir
    from hpc_infer.rundir.lease import Lock, fs_now

    victim = tmp_path / "victim"
    victim.write_text("precious")
    old = _time.time() - 10_000
    os.utime(victim, (old, old))
    path = tmp_path / "merge.lock"
    path.symlink_to(victim)
    lock = Lock(path, lease_s=0.4, poll_s=0.02)
    assert lock._stale() is not None  # a link is no lock this code made (its target's age is never read)
    lock.acquire()  # taken over: the link replaced, never followed
    try:
        assert not path.is_symlink() and json.loads(path.read_text())["token"] == lock.owner["token"]
        path.unlink()
        path.symlink_to(victim)  # swapped in while held: the refresh thread touches the lock
        _time.sleep(0.3)  # three refreshes (every lease/4); they may fail, never follow
    finally:
        lock.release()
    fs = PinnedDir(tmp_path)
    (tmp_path / f".clock-{fs.tag}").symlink_to(victim)  # the clock probe is a link: never read through
    fs_now(fs)
    fs.close()
    assert victim.read_text() == "precious" and victim.stat().st_mtime == old


def _old_take_over(run, chunk_id, owner, lease_s):
    """take_over before the fix: the stale claim renamed away (its name empty for a while),
    judged, and a live one linked back, which fails once a plain claimer filled the gap."""
    from hpc_infer.rundir import clock
    from hpc_infer.rundir.claims import _stale, try_claim
    from hpc_infer.rundir.lease import fs_now

    name = run.claim_name(chunk_id)
    grave = f"{name}.stale-{clock.token(16)}"
    try:
        run.fs.rename(name, grave)
    except FileNotFoundError:
        return False
    try:
        if not _stale(run, grave, lease_s, fs_now(run.fs, "claims")):
            try:
                run.fs.link(grave, name)
            except FileExistsError:
                pass
            return False
    finally:
        run.fs.unlink(grave)
    return try_claim(run, chunk_id, owner)


@pytest.mark.parametrize("take_over", ["now", "old"])
def test_two_takers_and_a_claimer_never_both_hold_a_chunk_in_any_interleaving(tmp_path, take_over):
    """A dead holder's stale claim; two workers take it over while a third claims the chunk
    plainly, their calls on the run's handle in every order (tests/interleave.py): at most
    one believes it holds the chunk, and the claim names it. The old takeover (rename away,
    link back) fails: the explorer finds the order where the link back meets the claimer's
    fresh claim and two hold it."""
    import time as _time

    from interleave import explore

    own = {n: claims.Owner(n, "elsewhere", 10**6 + k) for k, n in enumerate("abc")}
    take = claims.take_over if take_over == "now" else _old_take_over

    def setup(fs):
        fs.mkdir("claims")
        fs.create("claims/00000", claims.Owner("dead", "elsewhere", 1).to_bytes())
        old = _time.time() - 1000  # no heartbeat: the claim's own age says its holder is gone
        os.utime(f"{fs.path}/claims/00000", (old, old))

    def taker(n):
        return lambda fs: take(RunDir(Path(fs.path), given_fs=fs), 0, own[n], 30.0)

    def claimer(fs):
        return claims.try_claim(RunDir(Path(fs.path), given_fs=fs), 0, own["c"])

    def check(fs, results, errors):
        if any(errors):
            return f"raised {errors}"
        if results.count(True) > 1:
            return f"two hold it: {results}"
        holder = claims.read_owner(fs, "claims/00000")
        if True in results and holder != own["abc"[results.index(True)]]:
            return f"the claim names {holder}, not the taker"
        return None

    runs, broken = explore(tmp_path, setup, [taker("a"), taker("b"), claimer], check, depth=7)
    if take_over == "now":
        assert runs > 100 and not broken, broken[:2]
    else:
        assert broken and all("two hold it" in what for _, what in broken), broken[:2]


def test_two_lock_takers_and_a_plain_taker_never_both_hold_it_in_any_interleaving(tmp_path):
    """A dead holder's lock (merge, download, cache stage); two processes take it over and a
    third takes it plainly, each call on the folder's handle in every order: at most one
    holds it, and the lock file names it."""
    import time as _time

    from interleave import explore

    from hpc_infer.rundir.lease import Lock

    def setup(fs):
        fs.create("merge.lock", json.dumps({"host": "elsewhere", "pid": 1, "token": "dead"}).encode())
        old = _time.time() - 1000
        os.utime(f"{fs.path}/merge.lock", (old, old))

    locks: dict[int, Lock] = {}

    def taker(k, plain=False):
        def act(fs):
            lock = locks[k] = Lock(Path(fs.path) / "merge.lock", lease_s=60, fs=fs)
            if lock._try():
                return True
            judged = None if plain else lock._stale()
            return judged is not None and lock._take_over(judged)

        return act

    def check(fs, results, errors):
        if any(errors):
            return f"raised {errors}"
        if results.count(True) > 1:
            return f"two hold it: {results}"
        token = json.loads(fs.read("merge.lock"))["token"]
        if True in results and token != locks[results.index(True)].owner["token"]:
            return "the lock names another"
        return None

    runs, broken = explore(tmp_path, setup, [taker(0), taker(1), taker(2, plain=True)], check, depth=7)
    assert runs > 100 and not broken, broken[:2]


def test_an_idle_worker_reads_notices_not_the_run_and_ends_on_done(tmp_path):
    """Once a listing shows nothing free, an idle worker's look is one listing of
    claims/notices/ and a sample of the claims it kept, never a listing of claims/ and
    out/ (at the tail every worker is idle: 10,000 workers listing 100,000 names each
    beat). A `freed-*` notice makes it list again; `done` ends it; the launcher clears
    an earlier launch's `done` before it submits workers (launch._submit)."""
    import socket

    from hpc_infer.rundir.fsio import PinnedDir

    run = RunDir(tmp_path)
    run.make()
    lister = {"n": 0}

    class Counting(PinnedDir):
        def listdir(self, sub=""):
            lister["n"] += sub in ("claims", "out")
            return super().listdir(sub)

    run = RunDir(tmp_path, Counting(tmp_path))
    host = socket.gethostname()
    other = claims.Owner("w1", host, os.getppid())  # a live process that is not us
    assert claims.try_claim(run, 0, other)
    write_json(run.heartbeat_path("w1"), {"worker": "w1", "host": host, "pid": other.pid, "state": "running"})
    (run.out / "00001.jsonl").write_text("x\n")  # done, as far as names go
    me = claimer.Claimer(run, 3, claims.Owner("w0", host, os.getpid()), lease_s=600, rank=2, of=3)
    assert me.next() == 2 and me.next() is None  # its stripe, then a listing: nothing free
    listed = lister["n"]
    for _ in range(5):
        assert 0 < me.idle_wait(poll_s=10) <= 10  # chunk 0 is held by a live worker: wait
        assert me.next() is None
    assert lister["n"] == listed, "an idle look listed the run"
    claims.release(run, 0, other)
    notices.post_freed(run)  # what a worker that lets a chunk go unfinished says
    assert me.idle_wait(poll_s=10) == 0.5 and lister["n"] == listed + 2  # listed again: chunk 0 is free
    assert me.next() == 0
    notices.post_done(run)
    assert me.idle_wait(poll_s=10) is None  # done: it ends, listing nothing
    notices.clear_notices(run)
    assert run.fs.listdir(notices.NOTICES) == []  # `done` and the freed-* notice: a new launch starts clean
    assert me.idle_wait(poll_s=10) is not None  # chunk 0 (ours now) is not done: a later launch's workers wait


def test_chunk_ids_past_99999_are_listed_and_odd_names_are_not(tmp_path):
    """Chunk names are `{id:05d}`: five digits up to 99,999, six from 100,000 on (10,000
    workers at the default 64 chunks a worker plan 640,000). The listings read exactly five
    digits, so chunk 100,000 on were never seen: claimed, done or backed up, and a run past
    100,000 chunks could not finish (the merge counts outputs from the same listing). A
    name that is not an id as we write it (an extra leading zero, a copy, a digit of
    another script, which `int()` refuses or misreads) is still not a chunk."""
    from hpc_infer.rundir.chunks import encode_chunk_output, publish_chunk_output

    run = RunDir(tmp_path)
    run.make()
    owner = claims.Owner("w0", "h", os.getpid())
    for cid in (99_999, 100_000, 123_456):
        rows = [{"id": str(cid), "index": cid, "text": "x"}]
        assert publish_chunk_output(run.fs, run.out_name(cid), cid, encode_chunk_output(cid, rows))
    assert claims.try_claim(run, 100_001, owner) and claims.try_claim(run, 7, owner)
    assert tail.try_backup(run, 100_002, owner)
    for odd in ("0100000.jsonl", "100000 (copy).jsonl", "1000000.jsonl.tmp", "\u0662" * 6 + ".jsonl"):
        (run.out / odd).write_text("x\n")
    for odd in ("0100001", "\u00b2" * 5, "1e5000"):
        (run.claims / odd).write_text("x\n")
        (run.claims / "backups" / odd).write_text("x\n")
    assert run.output_files() == run.done_chunks() == {99_999, 100_000, 123_456}
    assert run.claimed_chunks() == {7, 100_001}
    assert tail.backed_up(run) == {100_002}
    from hpc_infer.rundir.layout import chunk_id_of

    assert [chunk_id_of(s) for s in ("00000", "99999", "100000", "0100000", "0042", "\u0662" * 5)] == [
        0,
        99_999,
        100_000,
        None,
        None,
        None,
    ]


def test_a_worker_uses_anothers_listing_once_and_the_last_publisher_still_finds_the_run_done(tmp_path):
    """Listings of claims/ and out/ cost one call per 1,000 names, and every worker whose
    stripe is used up looks for work a few times a run: 0.068 x workers² calls, 558 readdir
    a second at 3,000 workers (bench/metadata_sim.py --balance). A worker that lists shares
    what it found (claims/notices/listing); another uses it once instead of listing, unless
    a `freed-*` notice is newer than it or it is damaged. A publisher whose shared listing
    shows nothing free and whose pending claims it samples are all done lists for itself, so
    the last publisher still finds the run done and posts `done`."""
    import socket

    from hpc_infer.rundir.chunks import encode_chunk_output, publish_chunk_output
    from hpc_infer.rundir.fsio import PinnedDir

    RunDir(tmp_path).make()
    listed: dict[str, int] = {}
    reader = {"who": ""}

    class Counting(PinnedDir):
        def listdir(self, sub=""):
            if sub in ("claims", "out"):
                listed[reader["who"]] = listed.get(reader["who"], 0) + 1
            return super().listdir(sub)

    run = RunDir(tmp_path, Counting(tmp_path))
    host = socket.gethostname()
    a = claimer.Claimer(run, 6, claims.Owner("a", host, os.getpid()), lease_s=600, rank=0, of=2)
    b = claimer.Claimer(run, 6, claims.Owner("b", host, os.getpid()), lease_s=600, rank=1, of=2)
    listed.clear()  # (each start lists out/ once: what a relaunch has done)

    def publish(c: claimer.Claimer, cid: int) -> None:
        rows = [{"id": str(cid), "index": cid, "text": "x"}]
        assert publish_chunk_output(run.fs, run.out_name(cid), cid, encode_chunk_output(cid, rows))
        claims.release(run, cid, c.owner)
        c.published()

    def look(c: claimer.Claimer, who: str) -> int | None:
        reader["who"] = who
        c._listed = float("-inf")  # as a look LIST_FRESH_S later
        return c.next()

    assert [look(a, "a") for _ in range(4)] == [0, 3, 4, 1]  # its stripe, then chunk 1 from its own listing
    assert listed == {"a": 2} and a.listings == 1
    assert [look(b, "b") for _ in range(3)] == [2, 5, None]  # its stripe (1 was taken), then a's listing
    assert "b" not in listed and b.shared_used == 1, "b listed the run instead of using a's listing"
    assert look(b, "b") is None and listed["b"] == 2  # used once: the next look lists

    for cid in (0, 3, 4, 1):
        publish(a, cid)
    assert look(a, "a") is None and a.shared_used == 1 and a.listings == 1  # b's: nothing free, 2 and 5 pending
    assert look(a, "a") is None and a.listings == 2  # used once: it lists (and shares)
    publish(b, 2)
    publish(b, 5)
    assert look(b, "b") is None and b.listings == 2 and b.shared_used == 1  # a's pending 2 and 5 are done: it lists
    assert b.idle_wait(poll_s=10) is None and run.fs.exists(notices.DONE_NOTICE)

    notices.clear_notices(run)
    assert run.fs.listdir(notices.NOTICES) == []  # the launch clears the shared listing with the notices
    c = claimer.Claimer(run, 6, claims.Owner("c", host, os.getpid()), lease_s=600, rank=0, of=1)
    run.fs.replace(notices.SHARED_LISTING, b'{"token": "x", "n_chunks": 6, "free": [99]}')  # damaged
    assert look(c, "c") is None and c.listings == 1 and c.shared_used == 0
    d = claimer.Claimer(run, 6, claims.Owner("d", host, os.getpid()), lease_s=600, rank=0, of=1)
    notices.post_freed(run)  # newer than c's listing: d does not use it
    assert look(d, "d") is None and d.listings == 1 and d.shared_used == 0


def test_the_launcher_waits_out_a_lagging_view_when_the_workers_said_done(tmp_path):
    """Every job ended and the launcher's look misses the last output: on a shared file
    system its client's attribute and entry caches can hide for seconds what another node
    just published (tests/test_sharedfs.py mounts them with 3 s). It resubmitted workers
    then (a third worker that found nothing to do, seen in CI). When a worker's listing
    found every output (the `done` notice), `wait` looks again until its view catches up;
    without the notice it ends at once, as before."""
    import json

    from conftest import compose
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.run.progress import wait
    from hpc_infer.rundir.chunks import encode_chunk_output, publish_chunk_output

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"q {i}"}) + "\n" for i in range(8)))
    rc = compose(f"output_root={tmp_path}/runs", f"data.path={data}", "cluster=local", "cluster.workers=2")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    n = run.read_json("manifest.json")["n_chunks"]

    def publish(cid: int) -> None:
        rows = [{"id": str(cid), "index": cid, "text": "x"}]
        assert publish_chunk_output(run.fs, run.out_name(cid), cid, encode_chunk_output(cid, rows))

    for cid in range(n - 1):
        publish(cid)
    looks = {"n": 0}

    def ended() -> dict[str, str]:  # every job ended; the last output shows up at the third look
        looks["n"] += 1
        if looks["n"] == 3:
            publish(n - 1)
        return {"1": "COMPLETED"}

    assert not wait(run, ended, poll_s=0.01, show=False).complete  # no notice: ends at the first look
    notices.post_done(run)
    looks["n"] = 0
    assert wait(run, ended, poll_s=0.01, show=False).complete and looks["n"] >= 3


@pytest.mark.parametrize("old", [False, True])
def test_a_live_holders_claim_left_after_its_publish_is_not_waited_on(tmp_path, monkeypatch, old):
    """A release reads its claim's owner first; a read error there leaves the claim after
    the chunk is published. Its holder lives, so by the lease alone its claim never goes
    stale: an idle worker whose pool held it waited a lease, found the holder alive, and
    waited again, for ever, never listing the run again (the protocol simulator found it,
    seed 2307 of a search of early requeues with EIO). The holder's next beats no longer list
    the chunk, so half a lease after the claim it is disowned (claims.disowned, the one rule
    for every claim a failed release leaves): the idle worker takes it over, finds the output,
    lets it go and lists the run again. `old`: disowning turned off (`holds` always true)."""
    import socket

    from hpc_infer.rundir.chunks import encode_chunk_output, publish_chunk_output
    from hpc_infer.worker.heartbeat import Heartbeat

    if old:
        for module in (claims, claimer):  # the rule both use
            monkeypatch.setattr(module, "holds", lambda beat, cid: True)
    run = RunDir(tmp_path)
    run.make()
    host = socket.gethostname()
    b_owner = claims.Owner("b", host, os.getpid())
    b = claimer.Claimer(run, 1, b_owner, lease_s=600, rank=0, of=2)
    a = claimer.Claimer(run, 1, claims.Owner("a", host, os.getpid()), lease_s=600, rank=1, of=2)
    hb = Heartbeat(run, b_owner, 10.0, 600.0)
    hb.beat()  # b lives and beats
    assert (b.next(), a.next()) == (0, None)
    assert a.idle_wait(10.0) == 10.0  # a listed: the one chunk is b's, running
    rows = [{"id": "0", "index": 0, "text": "x"}]
    assert publish_chunk_output(run.fs, run.out_name(0), 0, encode_chunk_output(0, rows))
    b.published()  # b's release failed: its claim stays
    made = time.time() - 400  # the claim: 400 s old (two thirds of a lease) by the file server's clock
    os.utime(run.claim_path(0), (made, made))
    hb.update(held=[])
    hb.beat()  # b beats on, holding nothing
    a._expiry_due = 0.0  # a lease later: the sampled claims are read again
    waits = []
    for _ in range(3):
        a._listed = float("-inf")  # each look LIST_FRESH_S after the last
        waits.append(a.idle_wait(10.0))
        if waits[-1] is not None:
            a._expiry_due = 0.0  # the wait is over
            assert a.next() is None  # a look: the disowned claim is taken over, done, let go
    if old:
        assert waits[-1] is not None  # still waiting on b's claim
        return
    assert waits[-1] is None and run.fs.exists(notices.DONE_NOTICE)


@pytest.mark.parametrize("old", [False, True])
def test_a_live_holders_claim_it_no_longer_holds_goes_stale(tmp_path, monkeypatch, old):
    """A release whose read of the owner failed leaves the claim of a chunk not yet done (a
    suspect won and released again: the protocol simulator, seed 301360). Its holder lives,
    so by the lease alone the claim never went stale and the run never finished. A beat
    written more than half a lease after the claim that does not list the chunk disowns it;
    a beat that lists it, or one from before, does not. `old`: the check turned off."""
    import socket

    if old:
        monkeypatch.setattr(claims, "holds", lambda beat, cid: True)
    run = RunDir(tmp_path)
    run.make()
    me = claims.Owner("w", socket.gethostname(), os.getpid())
    claims.try_claim(run, 0, me)
    made = time.time() - 400  # the claim: 400 s old, by the file server's clock
    os.utime(run.claim_path(0), (made, made))
    beat = {"worker": "w", "host": me.host, "pid": me.pid, "state": "running"}
    write_json(run.heartbeat_path("w"), dict(beat, held=[0]))
    assert not claims.is_stale(run, 0, lease_s=600)  # held: live
    write_json(run.heartbeat_path("w"), dict(beat, held=[3]))
    assert claims.is_stale(run, 0, lease_s=600) != old  # a beat 400 s after it, without it: disowned
    t = made + 200
    os.utime(run.heartbeat_path("w"), (t, t))
    assert not claims.is_stale(run, 0, lease_s=600)  # a beat 200 s after it: maybe composed before


def test_stripes_alternate_direction_so_each_holds_about_the_same_work():
    """Chunks shrink along the plan, so the same place in every round gave rank 0 the largest
    chunk of each round; a place reversed every other round evens the stripes out."""
    assert [claimer.stripe(r, 3, 8) for r in range(3)] == [[0, 5, 6], [1, 4, 7], [2, 3]]
    assert sorted(c for r in range(64) for c in claimer.stripe(r, 64, 1000)) == list(range(1000))
    assert [claimer.stripe(r, 4, 2) for r in range(4)] == [[0], [1], [0], [1]]  # more workers than chunks
    assert claimer.stripe(0, 3, 0) == []
    sizes = [1000 - c for c in range(640)]  # shrinking, as the guided plan's
    sums = [sum(sizes[c] for c in claimer.stripe(r, 64, 640)) for r in range(64)]
    old = [sum(sizes[c] for c in range(r, 640, 64)) for r in range(64)]
    assert max(sums) - min(sums) <= 64 < max(old) - min(old)
