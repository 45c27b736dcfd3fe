"""Merge N records from K chunk files vs. `cat` of the same bytes, with peak memory.

Builds a real run directory (planned by hpc_infer from N prompts, K chunks), writes each
chunk's output the way a worker does (one JSON line per record, like a 64-token answer),
then measures side by side: `cat out/*.jsonl > /dev/null`-style copy to a file, and
`hpc-infer merge` (full JSON validation of every line, exactly-once check against each
chunk's record set, input order restored). Each runs in a fresh process; peak RSS from
getrusage.

    .venv/bin/python bench/merge.py [--records 1000000] [--chunks 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MERGE = """
import resource, sys, time
sys.path.insert(0, sys.argv[2])
from hpc_infer.merge import merge
from hpc_infer.rundir import RunDir
t = time.perf_counter()
s = merge(RunDir(__import__("pathlib").Path(sys.argv[1])))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, s.records)
"""

CAT = """
import resource, sys, time, glob, shutil
t = time.perf_counter()
with open(sys.argv[2], "wb") as out:
    for p in sorted(glob.glob(sys.argv[1] + "/out/*.jsonl")):
        with open(p, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def build(tmp: Path, n: int, k: int) -> Path:
    from array import array

    from hpc_infer.rundir import RunDir, write_json

    run = RunDir(tmp / "run")
    run.make()
    per = [[] for _ in range(k)]
    for i in range(n):  # scattered like token-balanced chunks: not contiguous slices
        per[(i * 7919) % k].append(i)
    answer = "The answer is 42. " * 12
    for cid, idx in enumerate(per):
        (run.index_path(cid)).write_bytes(array("q", idx).tobytes())
        with open(run.out_path(cid), "w") as f:
            for i in idx:
                f.write(json.dumps({"id": f"q{i}", "index": i, "prompt": f"Question number {i}?", "text": answer,
                                    "outputs": [{"text": answer, "finish_reason": "length", "stop_reason": None,
                                                 "num_tokens": 64}],
                                    "prompt_tokens": 8, "output_tokens": 64, "seed": i, "worker": "w", "chunk": cid})
                        + "\n")
    write_json(run.manifest, {"n_records": n, "n_chunks": k, "chunks": []})
    write_json(run.worker_spec, {"sampling": {"temperature": 1.0, "max_tokens": 64}})
    return run.root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--chunks", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp), args.records, args.chunks)
        size = sum(p.stat().st_size for p in (root / "out").glob("*.jsonl"))
        cat = subprocess.run([sys.executable, "-c", CAT, str(root), str(Path(tmp) / "cat.out")],
                             capture_output=True, text=True, check=True).stdout.split()
        m = subprocess.run([sys.executable, "-c", MERGE, str(root), str(ROOT)], capture_output=True, text=True)
        if m.returncode:
            sys.exit(m.stderr)
        mt, mrss, records = m.stdout.split()
    ct, crss = float(cat[0]), int(cat[1])
    mt, mrss = float(mt), int(mrss)
    print(f"records={int(records):,} chunks={args.chunks} bytes={size / 1e6:.0f} MB")
    print(f"cat (copy the chunk files into one): {ct:6.2f} s  peak RSS {crss / 1024:6.0f} MB")
    print(f"hpc_infer merge                    : {mt:6.2f} s  peak RSS {mrss / 1024:6.0f} MB")
    print(f"merge/cat time = {mt / ct:.1f}x")


if __name__ == "__main__":
    main()
