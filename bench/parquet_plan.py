"""Planning a large parquet set against the same records as jsonl: same plan, time, peak memory.

Writes N MATH-shaped rows (problem, solution, answer, subject, level, unique_id; default
1,000,000) three ways: one jsonl file, one parquet file (row groups of 65,536), and a
folder of 8 parquet shards named as the Hub names them (test-0000N-of-00008.parquet).
Each is planned by `plan_input` in a fresh process of its own (so each peak is its own),
with data=math_r1_zero's fields and the default chunking, and prints side by side:
seconds, the process's peak RSS (ru_maxrss), chunks, and whether the chunk table (records
and estimated tokens per chunk) and the record ids in order are those of the jsonl plan.

    .venv/bin/python bench/parquet_plan.py [--records 1000000] [--workers 64]

Parquet used to be read whole (`read_table(...).to_pylist()`): the peak grew with the
set. It is now decoded a record batch at a time (io/data.py: _table_rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rows(n: int):
    subjects = ["Algebra", "Prealgebra", "Number Theory", "Geometry", "Precalculus"]
    for i in range(n):
        s = subjects[i % 5]
        yield {
            "problem": f"Find the value of $x$ such that ${i % 97}x + {i % 13} = {i}$." + " Show work." * (i % 7),
            "solution": f"Subtract and divide: $x = \\boxed{{{i}}}$.",
            "answer": str(i),
            "subject": s,
            "level": 1 + i % 5,
            "unique_id": f"test/{s.lower().replace(' ', '_')}/{i}.json",
        }


def write_inputs(tmp: Path, n: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl, one, folder = tmp / "math.jsonl", tmp / "math.parquet", tmp / "shards"
    folder.mkdir()
    batch, k = [], 0
    shard_rows = -(-n // 8)
    with open(jl, "w") as f, pq.ParquetWriter(one, pa.Table.from_pylist(list(rows(1))).schema) as w:
        shard_writer, shard_k, in_shard = None, 0, 0
        for r in rows(n):
            f.write(json.dumps(r) + "\n")
            batch.append(r)
            if len(batch) == 65_536 or k == n - 1:
                table = pa.Table.from_pylist(batch)
                w.write_table(table)
                start = 0
                while start < len(batch):  # the same rows into 8 shards
                    if shard_writer is None:
                        shard_writer = pq.ParquetWriter(folder / f"test-{shard_k:05d}-of-00008.parquet", table.schema)
                    take = min(shard_rows - in_shard, len(batch) - start)
                    shard_writer.write_table(table.slice(start, take))
                    start, in_shard = start + take, in_shard + take
                    if in_shard == shard_rows:
                        shard_writer.close()
                        shard_writer, shard_k, in_shard = None, shard_k + 1, 0
                batch = []
            k += 1
        if shard_writer is not None:
            shard_writer.close()
    return {"jsonl": jl, "parquet (one file)": one, "parquet (8 shards)": folder}


def child(path: str, workers: int, out_root: str) -> None:
    """One plan in this process: prints its time, peak RSS and the plan's digest."""
    from hydra import compose, initialize_config_dir

    from hpc_infer.config import register_configs, to_run_config
    from hpc_infer.run.plan import plan_input

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "hpc_infer/conf"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "data=math_r1_zero",
                f"data.path={path}",
                f"output_root={out_root}",
                f"cluster.workers={workers}",
                "data.group_prefixes=off",
            ],
        )
    rc = to_run_config(cfg)
    t = time.perf_counter()
    planned = plan_input(rc)
    seconds = time.perf_counter() - t
    table = [(c["n_records"], c["est_tokens"]) for c in planned.chunks]
    from hpc_infer.rundir import RunDir  # the ids in order, read back from the chunk files
    from hpc_infer.rundir.chunks import read_chunk_source

    ids = hashlib.sha256()
    fs = RunDir(planned.staging).fs
    for c in planned.chunks:
        for r in read_chunk_source(fs, c, planned.spec.to_json()).records:
            ids.update(r["id"].encode() + b"\0")
    planned.discard()
    print(
        json.dumps(
            {
                "s": seconds,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "chunks": len(table),
                "records": planned.n_records,
                "table": hashlib.sha256(json.dumps(table).encode()).hexdigest(),
                "ids": ids.hexdigest(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_ = Path(tmp)
        inputs = write_inputs(tmp_, args.records)
        sizes = {
            k: sum(f.stat().st_size for f in ([p] if p.is_file() else p.iterdir())) / 1e6 for k, p in inputs.items()
        }
        got = {}
        for name, path in inputs.items():
            p = subprocess.run(
                [sys.executable, __file__, "--child", str(path), str(args.workers), str(tmp_ / "runs")],
                capture_output=True,
                text=True,
            )
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            got[name] = json.loads(p.stdout.strip().splitlines()[-1])
    base = got["jsonl"]
    print(f"{args.records:,} MATH-shaped records, {args.workers} workers, data=math_r1_zero, group_prefixes=off")
    print(f"{'input':22} {'MB':>7} {'plan s':>7} {'peak MB':>8} {'chunks':>7}  vs jsonl")
    for name, r in got.items():
        ids = r["ids"] == base["ids"] and r["records"] == base["records"]
        table = r["table"] == base["table"]
        print(
            f"{name:22} {sizes[name]:7.1f} {r['s']:7.2f} {r['peak_mb']:8.0f} {r['chunks']:7}  "
            f"time {r['s'] / base['s']:.2f}x, peak {r['peak_mb'] / base['peak_mb']:.2f}x; records and ids in order: "
            f"{'same' if ids else 'DIFFERENT'}; chunk table: {'same' if table else 'differs'}"
        )
    print(
        "(the chunk cutter sizes chunks from a running estimate of the whole set: from bytes read in jsonl, "
        "from rows read against the footers' row count in parquet, so cut points may differ by a chunk)"
    )


if __name__ == "__main__":
    main()
