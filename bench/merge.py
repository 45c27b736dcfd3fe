"""Merge N records from K chunk files vs. `cat` of the same bytes, with peak memory.

Builds a real run directory (planned by hpc_infer from N prompts, K chunks), writes each
chunk's output the way a worker does (one JSON line per record, like a 64-token answer),
then measures side by side: a `cat out/*.jsonl > file`-style copy, and `hpc-infer merge`
(every trailer checked against the manifest's chunk table, every byte's CRC-32 checked
while copying, input order, atomic rename, fsync). Each runs in a fresh process after a
warm-up read, so both read from the page cache; peak RSS from getrusage.

    .venv/bin/python bench/merge.py [--records 1000000] [--chunks 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MERGE = """
import resource, sys, time
sys.path.insert(0, sys.argv[2])
from hpc_infer.run.merge import merge
from hpc_infer.rundir import RunDir
t = time.perf_counter()
s = merge(RunDir(__import__("pathlib").Path(sys.argv[1])))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, s.records)
"""

CAT = """
import os, resource, sys, time, glob, shutil
t = time.perf_counter()
with open(sys.argv[2], "wb") as out:
    for p in sorted(glob.glob(sys.argv[1] + "/out/*.jsonl")):
        with open(p, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
    if sys.argv[3] == "fsync":
        out.flush()
        os.fsync(out.fileno())
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def build(tmp: Path, n: int, k: int) -> Path:
    from hpc_infer.rundir import RunDir, encode_chunk_output, write_atomic, write_json

    run = RunDir(tmp / "run")
    run.make()
    bounds = [n * c // k for c in range(k + 1)]  # contiguous chunks, as plan.make_chunks cuts them
    answer = "The answer is 42. " * 12
    table = []
    for cid in range(k):
        rows = [
            {
                "id": f"q{i}",
                "index": i,
                "prompt": f"Question number {i}?",
                "text": answer,
                "outputs": [{"text": answer, "finish_reason": "length", "stop_reason": None, "num_tokens": 64}],
                "prompt_tokens": 8,
                "output_tokens": 64,
                "seed": i,
                "worker": "w",
                "chunk": cid,
            }
            for i in range(bounds[cid], bounds[cid + 1])
        ]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows))  # what a worker writes
        table.append({"id": cid, "n_records": len(rows), "first_index": bounds[cid], "last_index": bounds[cid + 1] - 1})
    write_json(run.manifest, {"version": 2, "n_records": n, "n_chunks": k, "chunks": table})
    write_json(run.worker_spec, {"sampling": {"temperature": 1.0, "max_tokens": 64}})
    return run.root


def _run(code: str, *args: str) -> list[str]:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    return p.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3, help="runs of each; the fastest is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp), args.records, args.chunks)
        size = sum(p.stat().st_size for p in (root / "out").glob("*.jsonl"))
        cat, cat_sync, merge = [], [], []
        for _ in range(args.reps):  # interleaved, so both see the same page cache and disk
            cat.append(_run(CAT, str(root), str(Path(tmp) / "cat.out"), "nosync"))
            cat_sync.append(_run(CAT, str(root), str(Path(tmp) / "cat.out"), "fsync"))
            merge.append(_run(MERGE, str(root), str(ROOT)))
    (ct, crss), (cst, _), (mt, mrss, records) = (min(x, key=lambda r: float(r[0])) for x in (cat, cat_sync, merge))
    ct, cst, mt, crss, mrss = float(ct), float(cst), float(mt), int(crss), int(mrss)
    print(f"records={int(records):,} chunks={args.chunks} bytes={size / 1e6:.0f} MB (fastest of {args.reps})")
    print(f"cat (copy the chunk files into one)  : {ct:6.2f} s  peak RSS {crss / 1024:6.0f} MB")
    print(f"cat + fsync of the result            : {cst:6.2f} s")
    print(f"hpc_infer merge (checks, fsync)      : {mt:6.2f} s  peak RSS {mrss / 1024:6.0f} MB")
    print(f"merge/cat = {mt / ct:.2f}x   merge/(cat+fsync) = {mt / cst:.2f}x")


if __name__ == "__main__":
    main()
