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

`--before REV` runs REV's worker (from a git worktree) with the same FakeEngine patched in
for its vLLM engine: the protocol's cost, before and after, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NAMESPACE = ("open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
             "faccessat2", "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2",
             "link", "linkat", "utimensat", "utime", "utimes", "getdents64", "readlink", "readlinkat", "chmod",
             "fchmodat", "chown", "fchownat", "symlink", "symlinkat")
FAKE = {"step_s": 0.02, "max_num_seqs": 8}
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
             "sampling.max_tokens=4", "max_chunk_records={per_chunk}", "chunks_per_worker=64", "cluster.workers=64",
             "run_name=bench")
run, _ = prepare(rc, plan_input(rc), "/model/not/loaded", "")
print(run.root)
"""


def plan(root: Path, code: Path, n_records: int, chunks: int) -> Path:
    """A run of n_records short prompts in about `chunks` chunks, planned by that checkout
    as its `launch` plans (each version in its own run-directory format)."""
    script = PLAN.format(code=str(code), root=str(root), records=n_records, per_chunk=max(1, n_records // chunks))
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


def run_workers(run: Path, n: int, code: Path | None, trace_dir: Path) -> tuple[float, int]:
    """n workers to the end of the run, each under strace; (wall seconds, namespace calls)."""
    env = dict(os.environ, HPC_INFER_FAKE_ENGINE=json.dumps(FAKE), PYTHONUNBUFFERED="1")
    if code is not None:
        fake_dir = trace_dir / "fake"
        fake_dir.mkdir(exist_ok=True)
        shutil.copy(ROOT / "hpc_infer" / "worker" / "fake_engine.py", fake_dir / "fake_engine_copy.py")
        src = (fake_dir / "fake_engine_copy.py").read_text().replace("from .protocol import error_result",
                                                                    "from hpc_infer.worker.engine import error_result")
        (fake_dir / "fake_engine_copy.py").write_text(src)
        env.update(PYTHONPATH=str(code), HPC_INFER_BENCH_FAKE=str(fake_dir))
    procs = []
    t0 = time.time()
    for i in range(n):
        argv = ([sys.executable, "-c", OLD_WORKER, str(run), "--worker-id", f"w{i}"] if code is not None else
                [sys.executable, "-m", "hpc_infer.worker", str(run), "--worker-id", f"w{i}", "--rank", str(i),
                 "--of", str(n)])
        out = trace_dir / f"w{i}.strace"
        procs.append(subprocess.Popen(["strace", "-f", "-c", "-o", str(out), *argv], env=env, cwd=code or ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait()
    return time.time() - t0, count(sorted(trace_dir.glob("w*.strace")))


POLL = """
import sys, time
sys.path.insert(0, {root!r})
from hpc_infer.rundir import RunDir
from hpc_infer.run import {module} as progress
run = RunDir({run!r})
progress.snapshot(run)  # the first look (a launch's start) is not steady state
time.sleep(0.5)
for _ in range({polls}):
    progress.snapshot(run)
"""


def launcher_poll(run: Path, code: Path, module: str, polls: int, trace_dir: Path) -> float:
    """Namespace calls of one poll of the launcher's wait loop (its snapshot), in steady state."""
    script = POLL.format(root=str(code), module=module, run=str(run), polls=polls)
    base = trace_dir / "poll0.strace"
    subprocess.run(["strace", "-f", "-c", "-o", str(base), sys.executable, "-c",
                    POLL.format(root=str(code), module=module, run=str(run), polls=0)], check=True,
                   stdout=subprocess.DEVNULL, cwd=code)
    out = trace_dir / "poll.strace"
    subprocess.run(["strace", "-f", "-c", "-o", str(out), sys.executable, "-c", script], check=True,
                   stdout=subprocess.DEVNULL, cwd=code)
    return (count([out]) - count([base])) / polls


def measure(label: str, code: Path | None, sizes: list[int], records: int, chunks: int) -> list[dict]:
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench-meta-"))
        try:
            run = plan(tmp, code or ROOT, records, chunks)
            traces = tmp / "traces"
            traces.mkdir()
            wall, ops = run_workers(run, n, code, traces)
            n_chunks = json.loads((run / "manifest.json").read_text())["n_chunks"]
            module = "progress" if (Path(code or ROOT) / "hpc_infer" / "run" / "progress.py").exists() else "status"
            poll = launcher_poll(run, code or ROOT, module, 5, traces)
            rows.append({"code": label, "workers": n, "records": records, "chunks": n_chunks, "wall_s": round(wall, 1),
                         "ops": ops, "ops_per_record": round(ops / records, 2),
                         "ops_per_worker_s": round(ops / (n * wall), 2), "ops_per_poll": round(poll, 1)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def extrapolate(rows: list[dict], workers: int = 1000, chunks: int = 16000) -> dict:
    """A run of `workers` workers and `chunks` chunks: workers' steady rate from the largest
    measured size, the launcher's poll scaled by what it lists (chunks + heartbeats) over the
    measured, at its poll interval for that many workers (run/progress.py: poll_interval)."""
    from hpc_infer.run.progress import poll_interval

    big = max(rows, key=lambda r: r["workers"])
    per_poll = big["ops_per_poll"] * (chunks + workers) / (big["chunks"] + big["workers"])
    interval = poll_interval(workers)
    worker_ops = big["ops_per_worker_s"] * workers
    return {"workers": workers, "chunks": chunks, "worker_ops_per_s": round(worker_ops),
            "launcher_poll_s": interval, "launcher_ops_per_s": round(per_poll / interval),
            "total_ops_per_s": round(worker_ops + per_poll / interval)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="16,64,256")
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=2048)
    ap.add_argument("--before", default=None, help="a git revision whose worker to measure beside this one")
    args = ap.parse_args()
    sizes = [int(x) for x in args.workers.split(",")]
    rows = measure("this checkout", None, sizes, args.records, args.chunks)
    print("extrapolated:", json.dumps(extrapolate(rows)))
    if args.before:
        tree = Path(tempfile.mkdtemp(prefix="bench-before-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            before = measure(args.before, tree, sizes, args.records, args.chunks)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        for a, b in zip(before, rows):
            print(f"{a['workers']:>4} workers: ops/record {a['ops_per_record']} -> {b['ops_per_record']}, "
                  f"ops/worker-s {a['ops_per_worker_s']} -> {b['ops_per_worker_s']}, "
                  f"ops/poll {a['ops_per_poll']} -> {b['ops_per_poll']}")


if __name__ == "__main__":
    main()
