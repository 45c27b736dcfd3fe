"""A deterministic simulation of the run-directory protocol (FoundationDB's simulation
testing and TigerBeetle's VOPR are the models): the real Worker, claims, leases, publish,
attempts and heartbeats run unchanged in one thread, over the simulated file server
(hpc_infer/rundir/simfs.py) and the fake engine, driven one turn at a time from a seed.

A seed gives a `Schedule`: how many workers, the chunk layout (contiguous or
prefix-grouped), records the engine refuses, per-node clock skew, the clients' cache
staleness, file-server faults, and timed events (SIGKILL, SIGTERM, a requeue under the
same worker id, the warning before a time limit (SIGUSR2: the worker stops, the rendered
script requeues it), a node failure, a node's mount failing for a while, a worker that
never starts, a relaunch, a node's clock stepped; SIGKILL after a stop signal's grace),
and links whose reply is lost. `run_schedule` plays it and checks the invariants after every step
and at the end; a failure raises `Broken` with the schedule, which `shrink` reduces to a
minimal one that still fails, printed so that it replays exactly (`Schedule(...)`).
"""

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpc_infer.rundir import RunDir, claims, clock, lease, tail
from hpc_infer.rundir.beats import seconds_ran
from hpc_infer.rundir.chunks import TRAILER_KEY, trailer_in
from hpc_infer.rundir.layout import chunk_id_of
from hpc_infer.rundir.simfs import Faults, SimClient, SimServer
from hpc_infer.worker.fake_engine import FakeEngine, FakeEngineDied
from hpc_infer.worker.worker import DONE, HeartbeatLost, Worker

ROOT = "run"
EPOCH = 1.8e9  # simulated clocks read like real ones (seconds since 1970), node skew added
LEASE_S, HEARTBEAT_S = 30.0, 2.0
# once every chunk is published, a live worker ends within this (its idle look comes every
# beat; the `done` notice is seen through the attribute cache): the end invariant adds ac_s
END_S = 2 * HEARTBEAT_S + 1.0
T_MAX = 3000.0


class Broken(AssertionError):
    pass


# --- layouts: real plans, made once ------------------------------------------------------------


@dataclass
class Layout:
    name: str
    files: dict[str, bytes]
    ids: list[str]  # in input order
    lines: dict[str, int]  # id -> its line in the input
    n_chunks: int
    root: Path | None = None  # the planned run on disk (real workers can run it too)


def plan_layouts(tmp: Path) -> dict[str, Layout]:
    """Two real plans of one input by the real planner: contiguous chunks, and
    prefix-grouped ones (documents x questions, shuffled)."""
    from conftest import compose

    from hpc_infer.run.plan import plan_input, prepare

    data = tmp / "in.jsonl"
    rows = [
        {"id": f"d{d}q{q}", "prompt": f"Document {d}: " + f"the story of item {d}. " * 60 + f"\nQuestion {q}?"}
        for d in range(6)
        for q in range(5)
    ]
    random.Random(3).shuffle(rows)
    lines, text = {}, ""
    for i, r in enumerate(rows):
        if i % 7 == 3:
            text += "\n"  # a blank line: each record keeps its own line number
        text += json.dumps(r) + "\n"
        lines[r["id"]] = text.count("\n")
    data.write_text(text)
    out = {}
    for name, group in (("plain", "off"), ("grouped", "auto")):
        rc = compose(
            f"output_root={tmp}/{name}",
            f"data.path={data}",
            "cluster=local",
            "cluster.workers=4",
            f"data.group_prefixes={group}",
            "sampling=greedy",
            "sampling.max_tokens=4",
            f"cluster.lease_s={LEASE_S}",
            f"cluster.heartbeat_s={HEARTBEAT_S}",
            "cluster.straggler_pacing=false",
        )
        run, _ = prepare(rc, plan_input(rc), "/m", "")
        files = {
            str(p.relative_to(run.root)): p.read_bytes()
            for p in run.root.rglob("*")
            if p.is_file() and p.name in ("manifest.json", "worker.json", "input.copy", "order.bin", "run_id")
        }
        manifest = json.loads(files["manifest.json"])
        if group == "auto":
            assert manifest.get("grouped"), "the grouped layout did not group"
        out[name] = Layout(name, files, [r["id"] for r in rows], lines, manifest["n_chunks"])
    return out


def sized_layout(
    tmp: Path,
    workers: int,
    chunks_per_worker: int,
    records: int,
    name: str = "sized",
    cap: bool = True,
    heartbeat_s: float = 10.0,
    lease_s: float = 600.0,
) -> Layout:
    """A real plan of `workers x chunks_per_worker x records` short uniform records (the
    metadata bench's and the ETA check's: a known rate), every chunk `records` long (`cap`),
    or cut as the planner cuts them (guided: shrinking towards the end)."""
    from conftest import compose

    from hpc_infer.run.plan import plan_input, prepare

    n = workers * chunks_per_worker * records
    data = tmp / f"in{workers}.jsonl"
    with open(data, "w") as f:
        for i in range(n):
            f.write(f'{{"id": "r{i}", "prompt": "q {i}"}}\n')
    rc = compose(
        f"output_root={tmp}/runs{workers}",
        f"data.path={data}",
        "cluster=local",
        f"cluster.workers={workers}",
        f"chunks_per_worker={chunks_per_worker}",
        f"max_chunk_records={records if cap else 2000}",
        "data.group_prefixes=off",
        "sampling=greedy",
        "sampling.max_tokens=9",
        f"cluster.lease_s={lease_s}",
        f"cluster.heartbeat_s={heartbeat_s}",
    )
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    files = {n: (run.root / n).read_bytes() for n in ("manifest.json", "worker.json", "input.copy", "run_id")}
    manifest = json.loads(files["manifest.json"])
    return Layout(name, files, [f"r{i}" for i in range(n)], {}, manifest["n_chunks"], run.root)


# --- schedules ---------------------------------------------------------------------------------


@dataclass
class Schedule:
    seed: int
    layout: str
    workers: int
    events: list[tuple[float, str, int, float]]  # (time, kind, worker slot, argument)
    refuse: list[str] = field(default_factory=list)
    skew: list[float] = field(default_factory=list)  # per node
    ac_s: float = 0.0
    eio: float = 0.0
    estale: float = 0.0
    slow: dict = field(default_factory=dict)
    link_lost: float = 0.0  # links whose reply is lost: the retry sees EEXIST on its own link
    enospc: float = 0.0  # writes refused: the quota or the disk full


KINDS = ("kill", "term", "requeue", "node_fail", "mount_down", "never_start", "relaunch", "clock_jump", "warn")
GRACE_S = 5.0  # a stop signal's grace (Slurm's KillWait, scaled to these runs): SIGKILL after it


def random_schedule(seed: int, layout: Layout) -> Schedule:
    rng = random.Random(seed)
    workers = rng.randint(1, 6)
    events = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
        kind = rng.choice(KINDS)
        # half while the small layouts' runs last (well under a second), half over the tail
        t = rng.uniform(0, 0.5) if rng.random() < 0.5 else rng.uniform(0, 20)
        events.append((round(t, 3), kind, rng.randrange(workers), round(rng.uniform(1, 40), 3)))
    events.sort()
    refuse = rng.sample(layout.ids, rng.choice([0, 0, 1, 3]))
    sched = Schedule(
        seed,
        layout.name,
        workers,
        events,
        refuse,
        skew=[round(rng.uniform(-300, 300), 3) for _ in range(3)],
        ac_s=rng.choice([0.0, 0.0, 1.0, 3.0]),
        eio=rng.choice([0.0, 0.0, 0.002, 0.03]),
        estale=rng.choice([0.0, 0.05]),
        slow={f"w{rng.randrange(workers)}": rng.choice([1.0, 4.0])},
        link_lost=rng.choice([0.0, 0.0, 0.1, 0.5]),
        enospc=rng.choice([0.0, 0.0, 0.0, 0.01]),
    )
    if rng.random() < 0.2:  # crowded: up to 14 workers on the 16 chunks, more events (drawn
        # last, so the other four seeds in five replay as they did before crowding was added)
        sched.workers += rng.randint(4, 8)
        for _ in range(rng.randint(2, 6)):
            t = rng.uniform(0, 0.5) if rng.random() < 0.5 else rng.uniform(0, 30)
            sched.events.append(
                (round(t, 3), rng.choice(KINDS), rng.randrange(sched.workers), round(rng.uniform(1, 40), 3))
            )
        sched.events.sort()
        sched.slow[f"w{rng.randrange(sched.workers)}"] = 4.0
    return sched


# --- the simulation ----------------------------------------------------------------------------


class SimClock(clock.Clock):
    def __init__(self, sim: "Sim"):
        self.sim = sim

    def now(self) -> float:
        p = self.sim.current
        return EPOCH + self.sim.t + (self.sim.skew[p.node] if p is not None and self.sim.skew else 0.0)

    def monotonic(self) -> float:
        return self.sim.t  # no skew, no step: every process's monotonic clock runs with the simulation

    def sleep(self, s: float) -> None:
        if self.sim.current is not None:
            self.sim.current.debt += s

    def token(self, nbytes: int = 4) -> str:
        return "%0*x" % (2 * nbytes, self.sim.rng.getrandbits(8 * nbytes))

    def rng(self) -> random.Random:
        return self.sim.rng


@dataclass
class Proc:
    slot: int
    wid: str
    node: int
    pid: int
    worker: Worker | None = None
    client: SimClient | None = None
    next_step: float = 0.0
    next_beat: float = 0.0
    debt: float = 0.0
    alive: bool = True
    how: str = ""  # how it ended
    started_at: float = 0.0
    held_at_death: list[int] = field(default_factory=list)
    requeue_in: float | None = None  # warned of its time limit: requeued this long after it stops


class Sim:
    def __init__(
        self,
        sched: Schedule,
        layout: Layout,
        engine: dict | None = None,
        check: bool = True,
        launcher_poll: bool = False,
        t_max: float = T_MAX,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        """`engine`: the fake engine's settings; `check`: invariants after every step (the
        metadata bench turns them off: they read the whole server); `launcher_poll`: a
        launcher polling progress as `launch` does (run/progress.py)."""
        self.sched, self.layout = sched, layout
        self.skew = list(sched.skew)  # each node's clock against the server's; a clock_jump steps one
        from hpc_infer.rundir import chunks

        chunks._DONE_CACHE.clear()  # process-wide caches keyed by path: one schedule's never serve the next's
        tail._names.clear()
        lease._OFFSETS.clear()  # (keyed by client: pids repeat from one schedule to the next)
        self.engine_conf = engine or {"step_s": 0.05, "max_num_seqs": 8, "tokens": 4}
        self.check, self.launcher_poll, self.t_max, self.heartbeat_s = check, launcher_poll, t_max, heartbeat_s
        self.rng = random.Random(sched.seed * 7919 + 1)
        self.t = 0.0
        self.current: Proc | None = None
        self.server = SimServer(
            now=lambda: EPOCH + self.t,
            rng=self.rng,
            faults=Faults(eio=sched.eio, estale=sched.estale, enospc=sched.enospc, link_lost=sched.link_lost),
        )
        self.server.put_tree({f"{ROOT}/{k}": v for k, v in layout.files.items()})
        for d in ("claims", "out", "heartbeats", "logs"):
            self.server.lookup([ROOT, d], create_dirs=True)
        self.procs: list[Proc] = []
        self.next_pid = 1000
        self.down: dict[int, float] = {}  # node -> mount down until
        self.mount_ups: list[float] = []  # when each mount outage ends
        self.seen_outputs: dict[str, tuple[int, bytes]] = {}
        self.beats: dict[str, dict] = {}  # worker id -> the latest beat seen
        self.shown: list[tuple[float, float | None, int, int]] = []  # launcher polls: (t, ETA, done, total)
        self.segments: dict[str, list[float]] = {}  # worker id -> each ended process's running time
        self.deadlines: list[tuple[float, list[int], float]] = []  # (by when, chunks, death time)
        self.last_death = 0.0
        self.deaths: list[float] = []
        self.ends: list[float] = []  # when a process ended other than by finishing (killed, stopped)
        self.done_at: float | None = None
        self.relaunches = 0
        self.manifest = json.loads(layout.files["manifest.json"])
        self.sizes = {c["id"]: c["n_records"] for c in self.manifest["chunks"]}

    # --- processes ----------------------------------------------------------------------------
    def start(self, slot: int, wid: str | None = None) -> Proc:
        node = slot % max(1, len(self.sched.skew) or 1)
        p = Proc(slot, wid or f"w{slot}", node, self.next_pid, next_step=self.t, next_beat=self.t + self.heartbeat_s)
        p.started_at = self.t
        self.next_pid += 1
        p.client = SimClient(self.server, ROOT, f"node{node}-{p.pid}", ac_s=self.sched.ac_s, path="/sim/run")
        conf = dict(self.engine_conf, fail_ids=self.sched.refuse)
        conf["slow"] = self.sched.slow
        self.current = p
        try:
            p.worker = Worker(
                "/sim/run",
                run=RunDir(Path("/sim/run"), p.client),
                owner=claims.Owner(p.wid, f"simnode{node}", p.pid),
                engine=FakeEngine(conf, p.wid),
                rank=slot,
                of=self.sched.workers,
            )
            p.worker.begin(thread=False)
        except OSError:
            p.alive, p.how = False, "could not start (file server error)"
        self.current = None
        self.procs.append(p)
        return p

    def end(self, p: Proc, how: str) -> None:
        """A process ends: killed, stopped or finished. What it held is owed a takeover."""
        if not p.alive:
            return
        p.alive, p.how = False, how
        w = p.worker
        hb = self.server.lookup([ROOT, "heartbeats"]).entries.get(f"{p.wid}.json")
        beat = json.loads(self.server.nodes[hb].data) if hb else None
        if beat is not None and beat.get("pid") == p.pid:  # its last beat: the running time it wrote
            self.segments.setdefault(p.wid, []).append(beat["ran_s"])
        if how in ("killed", "crashed"):
            self.deaths.append(self.t)
        if how == "stopped" and p.requeue_in is not None:
            self.pending.append((self.t + p.requeue_in, p.slot, p.wid))
        if how != "finished":
            self.ends.append(self.t)
        if how in ("killed", "crashed") and w is not None:
            held = [c for c, k in w.inflight.items() if not k.backup]
            p.held_at_death = held
            self.last_death = self.t
            if held:
                self.deadlines.append((self.t + LEASE_S + 2 * HEARTBEAT_S + self.sched.ac_s + 2.0, held, self.t))

    # --- events -------------------------------------------------------------------------------
    def apply(self, kind: str, slot: int, arg: float) -> None:
        live = [p for p in self.procs if p.alive and p.slot == slot]
        if kind == "kill":
            for p in live:
                self.end(p, "killed")
        elif kind in ("term", "warn"):  # scancel / a time limit's end; the warning before a time limit
            for p in live:
                p.worker.stop_signal = signal.SIGTERM if kind == "term" else signal.SIGUSR2
                if kind == "warn":
                    p.requeue_in = arg  # the rendered script requeues the task when the worker exits 75
                self.timers.append((self.t + GRACE_S, "sigkill", p.pid, 0.0))
        elif kind == "sigkill":  # the grace ran out: by pid, only if that process still runs
            for p in [p for p in self.procs if p.alive and p.pid == slot]:
                self.end(p, "killed")
        elif kind == "requeue":
            for p in live:
                self.end(p, "killed")
                self.pending.append((self.t + arg, slot, p.wid))
        elif kind == "node_fail":
            node = slot % max(1, len(self.sched.skew) or 1)
            for p in self.procs:
                if p.alive and p.node == node:
                    self.end(p, "killed")
        elif kind == "mount_down":
            node = slot % max(1, len(self.sched.skew) or 1)
            self.down[node] = self.t + arg
            self.mount_ups.append(self.t + arg)
        elif kind == "clock_jump":  # a node's clock stepped (NTP, a VM resumed): by -400..+400 s
            node = slot % max(1, len(self.skew) or 1)
            if self.skew:
                self.skew[node] += (arg if int(arg) % 2 else -arg) * 10
        elif kind == "relaunch":  # the launcher: stale claims of dead workers dropped, one new worker each
            launcher = SimClient(self.server, ROOT, "launcher", ac_s=0.0, path="/sim/run")
            dead = {p.wid for p in self.procs if not p.alive}
            try:
                claims.release_dead(RunDir(Path("/sim/run"), launcher), LEASE_S, dead)
            except OSError:
                return  # the launch fails with the file server's error before it submits: no relaunch
            for p in [p for p in self.procs if not p.alive and p.how in ("killed", "crashed")]:
                self.relaunches += 1
                self.start(len(self.procs) + 100, f"r{self.relaunches}")

    # --- invariants ---------------------------------------------------------------------------
    def fail(self, what: str) -> None:
        raise Broken(f"t={self.t:.3f}: {what}\n  replay: {self.sched!r}")

    def check_step(self) -> None:
        run = [ROOT]
        out = self.server.lookup(run + ["out"])
        for name, ino in out.entries.items():
            cid = chunk_id_of(name.removesuffix(".jsonl")) if name.endswith(".jsonl") else None
            if cid is None:
                continue
            node = self.server.nodes[ino]
            before = self.seen_outputs.get(name)
            if before is None:
                self.seen_outputs[name] = (ino, node.data)
                self.check_output(cid, node.data)
            elif before != (ino, node.data):
                self.fail(f"out/{name} was published twice with different content")
        if self.done_at is None and len(self.seen_outputs) == self.layout.n_chunks:
            self.done_at = self.t
        if self.done_at is not None:
            self.check_ended()
        hb = self.server.lookup(run + ["heartbeats"])
        total = 0
        for name, ino in hb.entries.items():
            if name.startswith(".") or not name.endswith(".json"):
                continue
            beat = json.loads(self.server.nodes[ino].data)
            prev = self.beats.get(beat["worker"])
            if prev is not None:
                for key in ("chunks_done", "records_done", "output_tokens"):
                    if beat[key] < prev[key]:
                        self.fail(f"worker {beat['worker']}: {key} went back from {prev[key]} to {beat[key]}")
            self.beats[beat["worker"]] = beat
            total += beat["records_done"]
        if total > len(self.layout.ids):
            self.fail(f"progress counts {total} records of {len(self.layout.ids)}")
        for by, chunks_, died in list(self.deadlines):
            if self.t < by:
                continue
            self.deadlines.remove((by, chunks_, died))
            claimed = set(self.server.lookup(run + ["claims"]).entries)
            published = {n.removesuffix(".jsonl") for n in out.entries}
            if (
                not any(p.alive and p.started_at <= died for p in self.procs)
                or any(
                    t_ev > died and k in ("kill", "node_fail", "mount_down", "term", "requeue", "warn")
                    for t_ev, k, _, _ in self.sched.events
                )
                or any(died < t_d <= by for t_d in self.deaths)
                or any(f"{c:05d}" not in claimed | published for c in self.sizes)
            ):
                continue  # nobody lived through it, another fault came meanwhile, or free work kept them busy
            for c in chunks_:
                held = self.server.lookup(run + ["claims"]).entries.get(f"{c:05d}")
                done = f"{c:05d}.jsonl" in out.entries
                if not done and held is None:
                    self.fail(f"chunk {c}, held by a worker that died at {died:.1f}, not taken over by {by:.1f}")
                if not done and held is not None:
                    owner = json.loads(self.server.nodes[held].data or b"{}")
                    if owner.get("pid") not in [p.pid for p in self.procs if p.alive]:
                        self.fail(f"chunk {c}: still claimed by dead pid {owner.get('pid')} at {self.t:.1f}")

    def check_ended(self) -> None:
        """Liveness at the end: once every chunk is published, each live worker ends within
        END_S (+ the attribute cache) of that, of its own start, or of a mount coming back.
        The last publisher's listing finds the run done and posts `done`; the others see it at
        their next idle look. A process that ends otherwise after the run is done (killed,
        stopped: maybe the last publisher before it posted) leaves the others a lease to
        wait out its claims, and a mount down after that keeps its node from looking."""
        slack = END_S + self.sched.ac_s
        since = self.done_at
        ups = [u for u in self.mount_ups if u >= self.done_at]
        if ups:
            since = max(since, max(ups))
        if any(t >= self.done_at for t in self.ends):
            slack += LEASE_S + 2 * HEARTBEAT_S
        for p in self.procs:
            if p.alive and self.t > max(since, p.started_at) + slack:
                self.fail(
                    f"worker {p.wid} still running {self.t - max(since, p.started_at):.1f}s after every chunk "
                    f"was published (at {self.done_at:.1f}; allowed {slack:.1f}s)"
                )

    def check_output(self, cid: int, data: bytes) -> None:
        lines = data.decode().splitlines()
        trailer = json.loads(lines[-1])
        if trailer.get(TRAILER_KEY) != cid:
            self.fail(f"chunk {cid}'s output names chunk {trailer.get(TRAILER_KEY)}")
        rows = [json.loads(x) for x in lines[:-1]]
        if len(rows) != self.sizes[cid]:
            self.fail(f"chunk {cid}: {len(rows)} records published, planned {self.sizes[cid]}")
        for r in rows:
            if r.get("error"):
                if r["id"] not in self.sched.refuse:
                    self.fail(f"record {r['id']}: an error record ({r['error']}) it was never refused")
                if r.get("line") != self.layout.lines[r["id"]]:
                    self.fail(
                        f"record {r['id']}: error record names line {r.get('line')}, its line is "
                        f"{self.layout.lines[r['id']]}"
                    )
            elif r["id"] in self.sched.refuse:
                self.fail(f"record {r['id']} was refused but published as a result")

    def check_end(self) -> None:
        out = self.server.lookup([ROOT, "out"])
        done = {chunk_id_of(n.removesuffix(".jsonl")) for n in out.entries if n.endswith(".jsonl")} - {None}
        alive = [p for p in self.procs if p.alive]
        if alive and len(done) < self.layout.n_chunks:
            self.fail(
                f"the run hangs: {len(alive)} workers alive at the end ({self.t_max:g}s), chunks "
                f"{sorted(set(self.sizes) - done)} not done"
            )
        survivors = [p for p in self.procs if p.how == "finished"]
        if survivors and len(done) < self.layout.n_chunks:
            self.fail(
                f"worker {survivors[0].wid} finished with chunks {sorted(set(self.sizes) - done)} not done "
                f"(a live worker must not leave a dead holder's chunk behind)"
            )
        if len(done) == self.layout.n_chunks:  # the merge's view: every id once, in input order
            self.server.faults = Faults()  # the merge's reads: no injected faults
            fs = SimClient(self.server, ROOT, "merge", path="/sim/run")
            rows = []
            for cid in sorted(done):
                trailer, size = trailer_in(fs, f"out/{cid:05d}.jsonl")
                if trailer["bytes"] != size:
                    self.fail(f"chunk {cid}: trailer says {trailer['bytes']} bytes, file has {size}")
                rows += [json.loads(x) for x in fs.read(f"out/{cid:05d}.jsonl").decode().splitlines()[:-1]]
            got = [r["id"] for r in sorted(rows, key=lambda r: r["index"])]
            if got != self.layout.ids:
                self.fail(f"the merge's ids are not the input's, once each, in order: {got[:8]}...")
        self.check_counts(out)
        for wid, beat in self.beats.items():
            segs = self.segments.get(wid, [])
            counted = seconds_ran(beat)  # what the merge's GPU-hours and `status` count
            if any(p.alive and p.wid == wid for p in self.procs):  # its segment is still running
                counted = float(beat.get("earlier_s") or 0.0)
            if segs and abs(counted - sum(segs)) > 1e-3:
                self.fail(f"worker {wid}: its beat counts {counted:.3f}s, its processes ran {segs}")

    def check_counts(self, out) -> None:
        """Each worker's count of chunks it published, against the outputs that name it: never
        more; and exactly as many for a worker whose one process finished and wrote its last
        beat (what progress, the report and GPU-hours per record read)."""
        named: dict[str, int] = {}
        for name, ino in out.entries.items():
            if name.endswith(".jsonl"):
                last = self.server.nodes[ino].data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
                who = json.loads(last).get("worker")
                named[who] = named.get(who, 0) + 1
        for wid, beat in self.beats.items():  # (check_step read them after the last step)
            counted = beat["chunks_done"]
            procs = [p for p in self.procs if p.wid == wid]
            whole = len(procs) == 1 and procs[0].how == "finished" and beat.get("state") == "finished"
            if counted > named.get(wid, 0) or (whole and counted != named.get(wid, 0)):
                self.fail(f"worker {wid} counts {counted} chunks published, {named.get(wid, 0)} outputs name it")

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> "Sim":
        old = clock.current
        clock.current = SimClock(self)
        self.pending: list[tuple[float, int, str]] = []
        events = sorted(self.sched.events)
        self.timers: list[tuple[float, str, int, float]] = []  # events the events set (a grace's SIGKILL)
        never = {s for t, k, s, a in events if k == "never_start"}
        try:
            for slot in range(self.sched.workers):
                if slot not in never:
                    self.start(slot)
            import heapq

            queue = [(p.next_step, 0, i) for i, p in enumerate(self.procs)]
            queue += [(p.next_beat, 1, i) for i, p in enumerate(self.procs)]
            if self.launcher_poll:
                queue.append((0.0, 4, -1))
            heapq.heapify(queue)
            known = len(self.procs)
            while self.t < self.t_max:
                for i in range(known, len(self.procs)):  # started since: their first step and beat
                    heapq.heappush(queue, (self.procs[i].next_step, 0, i))
                    heapq.heappush(queue, (self.procs[i].next_beat, 1, i))
                known = len(self.procs)
                nxt = list(queue[:1])
                if self.timers:
                    events = sorted(events + self.timers)
                    self.timers = []
                if events:
                    nxt.append((events[0][0], 2, -1))
                if self.pending:
                    nxt.append((min(self.pending)[0], 3, -1))
                if not nxt:
                    break
                when, what, i = min(nxt)
                if what in (0, 1, 4):
                    heapq.heappop(queue)
                    if what != 4 and not self.procs[i].alive:
                        continue
                    if what == 0 and when != self.procs[i].next_step:
                        continue  # a turn moved earlier by a signal: this one is gone
                self.t = max(self.t, when)
                if what == 4:
                    heapq.heappush(queue, (self.t + self.poll(), 4, -1))
                elif what == 2:
                    _, kind, slot, arg = events.pop(0)
                    self.apply(kind, slot, arg)
                    for i, p in enumerate(self.procs):  # a signalled worker acts within a second (worker.py)
                        if p.alive and p.worker is not None and p.worker.stop_signal and p.next_step > self.t + 1.0:
                            p.next_step = self.t + 1.0
                            heapq.heappush(queue, (p.next_step, 0, i))
                elif what == 3:
                    self.pending.sort()
                    _, slot, wid = self.pending.pop(0)
                    self.start(slot, wid)
                else:
                    p = self.procs[i]
                    self.act(p, beat=what == 1)
                    if p.alive:
                        heapq.heappush(queue, (p.next_beat, 1, i) if what == 1 else (p.next_step, 0, i))
                if self.check:
                    self.check_step()
                if not any(p.alive for p in self.procs) and not events and not self.pending:
                    break  # (recounted: a requeued task may have started in this step)
            if self.check:
                self.check_end()
        finally:
            clock.current = old
        return self

    def poll(self) -> float:
        """One look of the launcher, as `launch` waits (run/progress.py): new outputs, the
        heartbeats in turns; the seconds to its next look."""
        from hpc_infer.run import progress

        if not hasattr(self, "_launcher"):
            client = SimClient(self.server, ROOT, "launcher", path="/sim/run")
            self._launcher = RunDir(Path("/sim/run"), client)
            self._tracker = progress.DoneTracker(self._launcher)
            self._beats = progress.BeatTracker(self._launcher)
        seen = progress.snapshot(self._launcher, self.manifest, 60.0, self._tracker, self._beats)
        self.shown.append((self.t, seen.eta_s, seen.records_done, seen.n_records))  # what launch shows, when
        if self.check:  # what launch and status show: never backwards, never over the totals
            before = getattr(self, "_shown", None)
            if seen.records_done > seen.n_records or seen.chunks_done > seen.n_chunks:
                self.fail(f"progress shows {seen.records_done}/{seen.n_records} records")
            if before is not None and seen.chunks_done < before.chunks_done:
                self.fail(f"progress went back from {before.chunks_done} to {seen.chunks_done} chunks")
            self._shown = seen
        return progress.poll_interval(self.sched.workers)

    def act(self, p: Proc, beat: bool) -> None:
        self.current = p
        p.client.down = self.down.get(p.node, 0.0) > self.t
        try:
            if beat:
                p.next_beat = self.t + self.heartbeat_s
                p.worker.hb.tick()
                return
            try:
                wait = p.worker.turn()
            except (FakeEngineDied, HeartbeatLost):
                self.end(p, "crashed")
                return
            except OSError:  # a file-server error the worker does not survive: its process ends
                self.end(p, "crashed")
                return
            except Exception as e:
                self.fail(f"worker {p.wid} raised {type(e).__name__}: {e}")
            p.next_step = self.t + p.debt + (wait if wait > 0 else 0.0) + 0.001
            p.debt = 0.0
            if wait == DONE:
                self.end(p, "stopped" if p.worker.stop_signal else "finished")
        finally:
            self.current = None


def run_schedule(sched: Schedule, layouts: dict[str, Layout], t_max: float = T_MAX) -> Sim:
    return Sim(sched, layouts[sched.layout], launcher_poll=True, t_max=t_max).run()


def shrink(sched: Schedule, layouts: dict[str, Layout], budget: int = 200) -> Schedule:
    """The smallest schedule found that still fails: events dropped one at a time, fewer
    workers, no refusals, no faults, no skew (each kept only if it still fails)."""

    def fails(s: Schedule) -> bool:
        try:
            run_schedule(s, layouts)
            return False
        except Broken:
            return True

    best, tries, changed = sched, 0, True
    while changed and tries < budget:
        changed = False
        candidates = [replace(best, events=best.events[:k] + best.events[k + 1 :]) for k in range(len(best.events))]
        candidates += [replace(best, workers=best.workers - 1)] if best.workers > 1 else []
        candidates += [replace(best, refuse=[])] if best.refuse else []
        candidates += [replace(best, eio=0.0, estale=0.0)] if best.eio or best.estale else []
        candidates += [replace(best, link_lost=0.0)] if best.link_lost else []
        candidates += [replace(best, enospc=0.0)] if best.enospc else []
        candidates += [replace(best, skew=[0.0] * len(best.skew))] if any(best.skew) else []
        candidates += [replace(best, ac_s=0.0)] if best.ac_s else []
        candidates += [replace(best, slow={})] if best.slow else []
        for c in candidates:
            tries += 1
            if fails(c):
                best, changed = c, True
                break
    return best
