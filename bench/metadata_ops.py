"""The run directory's metadata load: file-system calls per record, per worker-second and
per launcher poll, counted with `strace -c`, extrapolated to 1,000 workers.

A run's metadata operations land on the cluster's one metadata server (NFS, Lustre MDS,
GPFS), shared by every user: the budget is 500 operations a second for a whole run of
1,000 workers plus its launcher in steady state. Workers here are real worker processes
(`python -m hpc_infer.worker`) driven by the FakeEngine (worker/fake_engine.py: no model,
a known rate), so hundreds fit on a 2-core machine; the launcher's side is its wait loop's
snapshot (run/progress.py) against the same run directory.

Counted: the system calls that reach a file server's namespace (open/openat/creat,
stat/lstat/newfstatat/statx/access, mkdir, unlink, rename, link, utimensat, getdents64,
readlink, chmod/chown by path); not counted: reads and writes of open files, fstat of an
open descriptor (served from the client's cached attributes).

    .venv/bin/python bench/metadata_ops.py                       # this checkout, 16/64/256 workers
    .venv/bin/python bench/metadata_ops.py --before 86a6d31      # and the same with that commit's worker

`--trace N` traces N workers of each size among the others, which run untraced as forks of
one process that imported the worker once (1,000 real workers start, run 90 s and stop in
under 4 minutes on 2 cores); the per-worker-second window opens once every worker has
beaten.

`--before REV` runs REV's worker (from a git worktree) with the same FakeEngine patched in
for its vLLM engine: the protocol's cost, before and after, side by side.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NAMESPACE = (
    "open",
    "openat",
    "openat2",
    "creat",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "access",
    "faccessat",
    "faccessat2",
    "mkdir",
    "mkdirat",
    "unlink",
    "unlinkat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "utimensat",
    "utime",
    "utimes",
    "getdents64",
    "readlink",
    "readlinkat",
    "chmod",
    "fchmodat",
    "chown",
    "fchownat",
    "symlink",
    "symlinkat",
)
FAKE = {"step_s": 0.02, "max_num_seqs": 8}
HEARTBEAT_S = 10.0  # the default of every cluster config but `local` (5 s): what a 1,000-worker run beats at
OLD_WORKER = """
import json, os, sys
sys.path.insert(0, os.environ["HPC_INFER_BENCH_FAKE"])
from fake_engine_copy import FakeEngine
import hpc_infer.worker.engine as engine
engine.Engine.shared = classmethod(lambda cls, model: FakeEngine(json.loads(os.environ["HPC_INFER_FAKE_ENGINE"])))
from hpc_infer.worker.loop import main
sys.exit(main(sys.argv[1:]))
"""


PLAN = """
import json, sys
from pathlib import Path
sys.path[:0] = [{code!r}, {code!r} + "/tests"]
from conftest import compose
from hpc_infer.run.plan import plan_input, prepare
root = Path({root!r})
data = root / "prompts.jsonl"
data.write_text("".join(json.dumps({{"id": f"r{{i}}", "prompt": f"q{{i}}"}}) + "\\n" for i in range({records})))
rc = compose(f"output_root={{root}}/runs", f"data.path={{data}}", "cluster=local", "sampling=greedy",
             "sampling.max_tokens=4", "max_chunk_records={per_chunk}", "cluster.heartbeat_s={heartbeat_s}", "chunks_per_worker=64", "cluster.workers={workers}",
             "run_name=bench")
run, _ = prepare(rc, plan_input(rc), "/model/not/loaded", "")
print(run.root)
"""


def plan(root: Path, code: Path, n_records: int, chunks: int, workers: int = 64) -> Path:
    """A run of n_records short prompts in about `chunks` chunks, planned by that checkout
    as its `launch` plans (each version in its own run-directory format) for `workers`
    workers (past 500 the plan lengthens their beat: rundir/lease.py, beat_interval)."""
    root.mkdir(parents=True, exist_ok=True)
    script = PLAN.format(
        code=str(code),
        root=str(root),
        records=n_records,
        per_chunk=max(1, n_records // chunks),
        heartbeat_s=HEARTBEAT_S,
        workers=workers,
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=code)
    return Path(out.stdout.strip().splitlines()[-1])


def count(trace_files: list[Path]) -> int:
    """Namespace calls in `strace -c` summaries."""
    total = 0
    for f in trace_files:
        for line in f.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m and m.group(2) in NAMESPACE:
                total += int(m.group(1))
    return total


ZYGOTE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from hpc_infer.worker.worker import main  # imported once: each worker below is a fork of this process
pids = []
signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, signal.SIGTERM) for pid in pids])
for i in range({first}, {n}):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker sets its own once it starts
        code = 1
        try:
            code = main([{run!r}, "--worker-id", f"w{{i}}", "--rank", str(i), "--of", str({n})])
        finally:
            os._exit(code)
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
for pid in pids:
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
"""


def start_workers(
    run: Path,
    n: int,
    code: Path | None,
    trace_dir: Path,
    tag: str,
    fake: dict,
    timeout_s: float | None = None,
    extra: list[str] | None = None,
    timed: bool = False,
    traced: int | None = None,
) -> list:
    """n workers on `run`; the first `traced` of them (all when None) each under its own
    strace, the others plain: a sample of traced workers among many live untraced ones (a
    traced process runs several times slower, and 1,000 of them do not fit a machine). The
    untraced ones of this checkout are forks of one process that imported the worker once
    (ZYGOTE; its SIGTERM goes on to each of them): 1,000 interpreters importing the
    worker each is most of a 1,000-worker run's start on a small machine, and of its memory."""
    env = dict(os.environ, HPC_INFER_FAKE_ENGINE=json.dumps(fake), PYTHONUNBUFFERED="1")
    if code is not None:
        fake_dir = trace_dir / "fake"
        fake_dir.mkdir(exist_ok=True)
        src = (ROOT / "hpc_infer" / "worker" / "fake_engine.py").read_text()
        (fake_dir / "fake_engine_copy.py").write_text(
            src.replace("from .protocol import error_result", "from hpc_infer.worker.engine import error_result")
        )
        env.update(PYTHONPATH=str(code), HPC_INFER_BENCH_FAKE=str(fake_dir))
    traced = n if traced is None else min(n, traced)
    procs = []
    forks = code is None and traced < n and not extra and not timeout_s
    if forks:
        zygote = ZYGOTE.format(root=str(ROOT), run=str(run), first=traced, n=n)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", zygote], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        )
        procs[-1].stdout.readline()  # every fork made: the traced ones start among them
    for i in range(traced if forks else n):
        argv = (
            [sys.executable, "-c", OLD_WORKER, str(run), "--worker-id", f"w{i}"]
            if code is not None
            else [sys.executable, "-m", "hpc_infer.worker", str(run), "--worker-id", f"w{i}", "--rank", str(i)]
            + ["--of", str(n)]
        )
        out = trace_dir / f"{tag}{i}.strace"
        argv += extra or []
        if timeout_s:
            argv = ["timeout", "-s", "TERM", "-k", "60", str(timeout_s), *argv]
        tracer = ["strace", "-f", *(["-tt", "-e", "trace=%file,getdents64"] if timed else ["-c"]), "-o", str(out)]
        procs.append(
            subprocess.Popen(
                [*(tracer if i < traced else []), *argv],
                env=env,
                cwd=code or ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def wait_started(run: Path, n: int, deadline_s: float) -> int:
    """Wait until all n workers have beaten once (each has imported, read the run and
    claimed), or `deadline_s` has passed; returns how many had."""
    end = time.time() + deadline_s
    while True:
        beaten = len(list((run / "heartbeats").glob("*.json"))) if (run / "heartbeats").is_dir() else 0
        if beaten >= n or time.time() > end:
            return beaten
        time.sleep(1.0)


def stop(procs: list) -> None:
    """SIGTERM to every worker this bench started, by PID: a traced one is strace's child
    (strace itself holds fatal signals while it traces), the forks get theirs from the zygote."""
    import psutil

    for p in procs:
        try:
            kids = psutil.Process(p.pid).children() if p.args[0] == "strace" else []
        except psutil.NoSuchProcess:
            continue
        for target in kids or [p]:
            try:
                target.send_signal(signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass


def workers_until_done(
    run: Path, n: int, code: Path | None, trace_dir: Path, tag: str, extra: list[str] | None = None
) -> tuple[float, int]:
    t0 = time.time()
    for p in start_workers(run, n, code, trace_dir, tag, FAKE, extra=extra):
        p.wait()
    return time.time() - t0, count(sorted(trace_dir.glob(f"{tag}*.strace")))


def per_chunk_cost(code: Path | None, records: int, chunks: int, n: int = 16) -> dict:
    """Namespace calls per chunk: n fast workers through a fresh run, minus what n workers
    cost that start on a fresh run and claim nothing (--max-chunks 0: imports, the worker's
    setup, a heartbeat, exit)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-meta-"))
    try:
        run = plan(tmp, code or ROOT, records, chunks)
        idle_run = plan(tmp / "idle", code or ROOT, records, chunks)
        traces = tmp / "traces"
        traces.mkdir()
        wall, total = workers_until_done(run, n, code, traces, "run")
        _, idle = workers_until_done(idle_run, n, code, traces, "idle", ["--max-chunks", "0"])
        n_chunks = json.loads((run / "manifest.json").read_text())["n_chunks"]
        module = "progress" if ((code or ROOT) / "hpc_infer" / "run" / "progress.py").exists() else "status"
        poll = launcher_poll(run, code or ROOT, module, 5, traces)
        return {
            "chunks": n_chunks,
            "records": records,
            "ops_per_chunk": round((total - idle) / n_chunks, 2),
            "ops_per_record": round((total - idle) / records, 2),
            "startup_ops_per_worker": round(idle / n),
            "launcher_ops_per_poll": round(poll, 1),
            "poll_outputs": n_chunks,
            "poll_heartbeats": 2 * n,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BEAT = re.compile(r'"w\d+\.json"\)?\s*$|, "w\d+\.json"')
CLAIM = re.compile(r'(?:/claims/|^\d+, )"?\d+"?, ')


BEAT = re.compile(r'"w\d+\.json"\)?\s*$|, "w\d+\.json"')
CLAIM = re.compile(r'(?:/claims/|^\d+, )"?\d+"?, ')


def run_calls(trace: Path, run: Path) -> collections.Counter:
    """Namespace calls a traced worker made on the run directory, by kind: names relative to
    one of its pinned folders (a descriptor, never AT_FDCWD) or paths inside the run; what
    Python's imports and the engine cost elsewhere is left out."""
    kinds: collections.Counter = collections.Counter()
    for line in trace.read_text().splitlines():
        m = re.match(r"\s*\d+\s+[\d:.]+\s+(\w+)\((.*)", line)
        if not m or m.group(1) not in NAMESPACE:
            continue
        args = m.group(2)
        if m.group(1) == "newfstatat" and ', "",' in args:
            continue
        if re.match(r"\d+, ", args) or str(run) in args:
            kinds[m.group(1)] += 1
    return kinds


def steady_rate(trace: Path, kinds: collections.Counter | None = None) -> tuple[int, float]:
    """Namespace calls one worker made in steady state and over how many seconds, from an
    `strace -f -tt` log: from its first heartbeat write at least 10 s after its first claim
    to the last one before its final beat (its imports, first claims and shutdown left out, however long a loaded
    machine makes them). A stat of an open descriptor (newfstatat with an empty path) is not
    a namespace call. `kinds` collects the window's calls by system call."""
    beats: list[float] = []
    calls: list[float] = []
    claimed: float | None = None
    for line in trace.read_text().splitlines():
        m = re.match(r"\s*\d+\s+(\d+):(\d+):([\d.]+)\s+(\w+)\((.*)", line)
        if not m or m.group(4) not in NAMESPACE:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        args = m.group(5)
        if m.group(4) == "newfstatat" and ', "",' in args:
            continue
        calls.append((t, m.group(4)))
        # names are relative to the run's pinned folders (rundir/fsio.py): a beat is the rename
        # onto `heartbeats/<worker>.json`, a claim an O_EXCL create of `claims/<chunk id>`
        if m.group(4).startswith("rename") and (BEAT.search(args) or "/heartbeats/" in args):
            beats.append(t)
        if claimed is None and m.group(4) == "openat" and CLAIM.search(args) and "O_EXCL" in args:
            claimed = t
    # the last beat is the one written on the way out, after the SIGTERM's release of the
    # claims: a stop's cost, not steady state, so the window ends at the beat before it
    beats = [b for b in beats if claimed is not None and b >= claimed + 10][:-1]
    if len(beats) < 2:
        return 0, 0.0
    lo, hi = beats[0], beats[-1]
    inside = [kind for t, kind in calls if lo < t <= hi]
    if kinds is not None:
        kinds.update(inside)
    return len(inside), hi - lo


def per_worker_second(
    code: Path | None, n: int, window_s: float, startup: float, traced: int | None = None, kinds=None
) -> tuple[float, float]:
    """Namespace calls a second a working worker makes apart from finishing chunks (its
    heartbeat, pacing, checks): n workers each holding chunks that finish nothing, running
    `window_s` after the last of them has beaten once, then stopped by SIGTERM; counted
    between each traced worker's second and last heartbeat (steady_rate), summed over the
    workers. Twice the chunks the workers can hold (8 records a worker fill its engine), so no
    worker runs out of work in the window: what a worker costs at the tail of a run (its look
    for stale claims, its backup) is in the per-chunk figure, where it belongs. `traced`:
    only that many of the n workers are traced (the figure is theirs); `kinds` collects calls
    by kind. Returns (calls per worker-second, the traced workers' mean counted seconds)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-meta-"))
    procs: list = []
    try:
        run = plan(tmp, code or ROOT, 16 * n, 8 * n, workers=n)  # as a launch of n workers plans it
        traces = tmp / "traces"
        traces.mkdir()
        # records that never finish (a million tokens each), steps every half second
        t0 = time.time()
        procs = start_workers(
            run, n, code, traces, "slow", {"step_s": 0.5, "max_num_seqs": 8, "tokens": 10**6}, timed=True, traced=traced
        )
        beaten = wait_started(run, n, 120 + 2.0 * n)
        started = time.time() - t0
        time.sleep(window_s)
        stop(procs)
        for p in procs:
            p.wait()
        print(
            f"  {n} workers: {beaten} beating {started:.0f} s after the start, stopped {window_s:.0f} s later, "
            f"all gone {time.time() - t0:.0f} s after the start",
            flush=True,
        )
        counted = [steady_rate(f, kinds) for f in sorted(traces.glob("slow*.strace"))]
        seconds = sum(s for _, s in counted)
        steady = sum(1 for _, s in counted if s > 0)
        if steady < len(counted) / 2:
            print(
                f"  only {steady} of {len(counted)} traced workers reached a steady state in {window_s:.0f} s: "
                f"give a longer --window"
            )
        rate = sum(c for c, _ in counted) / seconds if seconds else float("nan")
        return rate, seconds / max(1, steady)
    finally:
        stop([p for p in procs if p.poll() is None])
        shutil.rmtree(tmp, ignore_errors=True)


POLL = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from hpc_infer.rundir import RunDir
from hpc_infer.run import {module} as progress
run = RunDir(Path({run!r}))
tracker = progress.DoneTracker(run) if hasattr(progress, "DoneTracker") else None  # as the wait loop keeps one
look = (lambda: progress.snapshot(run, tracker=tracker)) if tracker else (lambda: progress.snapshot(run))
look()  # the first look (a launch's start) is not steady state
time.sleep(0.5)
for _ in range({polls}):
    look()
"""


def launcher_poll(run: Path, code: Path, module: str, polls: int, trace_dir: Path) -> float:
    """Namespace calls of one poll of the launcher's wait loop (its snapshot), in steady state."""
    base, full = trace_dir / "poll0.strace", trace_dir / "poll.strace"
    for out, n in ((base, 0), (full, polls)):
        text = POLL.format(root=str(code), module=module, run=str(run), polls=n)
        p = subprocess.run(
            ["strace", "-f", "-c", "-o", str(out), sys.executable, "-c", text], capture_output=True, text=True, cwd=code
        )
        if p.returncode:
            raise RuntimeError(f"the launcher's poll failed: {p.stderr[-2000:]}")
    return (count([full]) - count([base])) / polls


def measure(
    label: str, code: Path | None, sizes: list[int], records: int, chunks: int, window_s: float, trace=None
) -> dict:
    chunk = per_chunk_cost(code, records, chunks)
    print(label, json.dumps(chunk), flush=True)
    rates = {}
    for n in sizes:
        kinds: collections.Counter = collections.Counter()
        rates[n] = round(per_worker_second(code, n, window_s, chunk["startup_ops_per_worker"], trace, kinds)[0], 3)
        sample = f" ({min(n, trace)} traced)" if trace else ""
        print(label, f"{n} workers{sample}: {rates[n]} namespace calls per worker-second; {dict(kinds)}", flush=True)
    return dict(chunk, per_worker_s=rates)


def extrapolate(m: dict, workers: int = 1000, chunks: int = 16000, run_hours: float = 1.0) -> dict:
    """A run of `workers` workers and `chunks` chunks finishing in `run_hours`: each worker's
    steady rate (the largest measured size), the chunks' share, and the launcher's poll
    scaled by what it lists and reads (outputs + heartbeats) at its interval for that many
    workers (run/progress.py: poll_interval)."""
    sys.path.insert(0, str(ROOT))
    from hpc_infer.run.progress import poll_interval

    per_worker = m["per_worker_s"][max(m["per_worker_s"])]
    listed = m["poll_outputs"] + m["poll_heartbeats"]
    poll = m["launcher_ops_per_poll"] * (chunks + workers) / listed
    out = {
        "workers": workers,
        "chunks": chunks,
        "run_hours": run_hours,
        "workers_ops_per_s": round(per_worker * workers),
        "chunks_ops_per_s": round(m["ops_per_chunk"] * chunks / (run_hours * 3600)),
        "launcher_ops_per_s": round(poll / poll_interval(workers)),
    }
    out["total_ops_per_s"] = out["workers_ops_per_s"] + out["chunks_ops_per_s"] + out["launcher_ops_per_s"]
    return out


def main() -> None:
    global HEARTBEAT_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="16,64,256")
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=2048)
    ap.add_argument("--window", type=float, default=120.0, help="seconds the per-worker-second runs last")
    ap.add_argument("--heartbeat", type=float, default=HEARTBEAT_S, help="cluster.heartbeat_s of the runs")
    ap.add_argument("--before", default=None, help="a git revision whose worker to measure beside this one")
    ap.add_argument("--trace", type=int, default=None, help="trace only this many workers of each size (a sample)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.workers.split(",")]
    HEARTBEAT_S = args.heartbeat
    results = {
        "this checkout": measure("this checkout", None, sizes, args.records, args.chunks, args.window, args.trace)
    }
    if args.before:
        tree = Path(tempfile.mkdtemp(prefix="bench-before-")) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before],
            check=True,
            capture_output=True,
        )
        try:
            results[args.before] = measure(args.before, tree, sizes, args.records, args.chunks, args.window, args.trace)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    print("\nnamespace calls (strace -c: open, stat, mkdir, unlink, rename, link, utime, getdents, ...)")
    for label, m in results.items():
        e = extrapolate(m)
        print(
            f"{label:>14}: {m['ops_per_chunk']} per chunk ({m['ops_per_record']} per record), per worker-second "
            f"{m['per_worker_s']}, launcher {m['launcher_ops_per_poll']} per poll ({m['poll_outputs']} outputs, "
            f"{m['poll_heartbeats']} heartbeats)"
        )
        print(
            f"{'':>14}  1,000 workers, 16,000 chunks in an hour: workers {e['workers_ops_per_s']}/s + chunks "
            f"{e['chunks_ops_per_s']}/s + launcher {e['launcher_ops_per_s']}/s = {e['total_ops_per_s']}/s "
            f"(budget 500/s)"
        )


if __name__ == "__main__":
    main()
