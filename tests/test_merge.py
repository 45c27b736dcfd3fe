"""Merge: input order restored, every record once, incomplete/corrupt runs refused."""

import json

import pyarrow.parquet as pq
import pytest

from conftest import compose

from hpc_infer.errors import UserError
from hpc_infer.run.merge import merge
from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rundir import read_chunk_records, encode_chunk_output, read_json, write_atomic


def planned_run(tmp_path, n=40, workers=3):
    data = tmp_path / "in.jsonl"
    # varied lengths so chunks differ in record count
    data.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": "w " * ((i * 7919) % 97 + 1)}) + "\n" for i in range(n))
    )
    rc = compose(f"data.path={data}", f"output_root={tmp_path / 'runs'}", "cluster=debug", f"cluster.workers={workers}")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    return run


def finish_chunk(run, cid):
    """Write a chunk's output the way a worker does (engine results are not the subject here)."""
    rows = [
        dict(r, text=f"out-{r['id']}", outputs=[], prompt_tokens=1, output_tokens=2)
        for r in read_chunk_records(run, cid)
    ]
    write_atomic(run.out_path(cid), encode_chunk_output(cid, rows))


def test_merge_restores_input_order_exactly_once(tmp_path):
    run = planned_run(tmp_path)
    n_chunks = read_json(run.manifest)["n_chunks"]
    for cid in reversed(range(n_chunks)):
        finish_chunk(run, cid)
    s = merge(run)
    rows = [json.loads(l) for l in open(s.results)]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(40)]
    assert [r["index"] for r in rows] == list(range(40))
    assert all(r["text"] == f"out-{r['id']}" for r in rows)
    assert s.records == 40 and not s.partial and s.output_tokens == 80
    assert read_json(run.summary)["records"] == 40


def test_incomplete_run_refused_with_missing_chunks(tmp_path):
    run = planned_run(tmp_path)
    n_chunks = read_json(run.manifest)["n_chunks"]
    for cid in range(1, n_chunks):
        finish_chunk(run, cid)
    with pytest.raises(UserError, match=r"incomplete: 1 of \d+ chunks have no output \(0\)"):
        merge(run)
    assert not (run.root / "results.jsonl").exists()
    s = merge(run, allow_partial=True)
    assert s.partial and s.chunks_missing == [0] and s.results.endswith("results.partial.jsonl")
    assert s.records == 40 - read_json(run.manifest)["chunks"][0]["n_records"]


def test_corrupt_truncated_duplicated_and_foreign_outputs_refused(tmp_path):
    run = planned_run(tmp_path)
    n_chunks = read_json(run.manifest)["n_chunks"]
    for cid in range(n_chunks):
        finish_chunk(run, cid)
    out = run.out_path(0)
    good = out.read_bytes()
    lines = good.splitlines(keepends=True)
    body, trailer = lines[:-1], lines[-1]
    cases = {
        "cut mid-line": (good[: len(good) // 2], "no valid trailer line"),
        "trailer lost": (b"".join(body), "no valid trailer line"),
        "a line missing": (b"".join(body[1:]) + trailer, "bytes of records, its trailer says"),
        "a line duplicated": (b"".join(body + body[:1]) + trailer, "bytes of records, its trailer says"),
        "a byte flipped": (good.replace(b"out-", b"OUT-", 1), "do not match their checksum"),
        "another chunk's file": (run.out_path(1).read_bytes(), "holds the output of chunk 1, not chunk 0"),
    }
    for name, (data, message) in cases.items():
        out.write_bytes(data)
        with pytest.raises(UserError, match=message + ".*redo chunk 0"):
            merge(run)
        assert not (run.root / "results.jsonl").exists(), name
        assert not list(run.root.glob(".results*")), name
    out.write_bytes(good)
    assert merge(run).records == 40


def test_parquet_output(tmp_path):
    run = planned_run(tmp_path, n=10, workers=1)
    for cid in range(read_json(run.manifest)["n_chunks"]):
        finish_chunk(run, cid)
    s = merge(run, fmt="parquet")
    table = pq.read_table(s.results)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(10)]
    n_chunks = read_json(run.manifest)["n_chunks"]
    assert n_chunks > 1 and pq.ParquetFile(s.results).num_row_groups == n_chunks  # one row group per chunk


def test_timeline_png_from_trailers_linked_from_summary(tmp_path):
    run = planned_run(tmp_path, n=30, workers=2)
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = [dict(r, text="x", outputs=[], prompt_tokens=1, output_tokens=2) for r in read_chunk_records(run, cid)]
        meta = {"worker": f"w{cid % 2}", "started": 100.0 + cid, "finished": 103.5 + cid}  # overlapping chunks
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, **meta))
    s = merge(run)
    assert s.timeline == "timeline.png" and read_json(run.summary)["timeline"] == "timeline.png"
    # the picture holds a bar of each chunk's colour (matplotlib's C0..C9 by chunk id, drawn
    # at alpha 0.8 over white), in lanes of both workers
    import matplotlib.colors
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(run.root / "timeline.png")[..., :3]
    assert pixels.shape[1] == 1100  # 11 in at 100 dpi
    rows = {}
    for cid in range(min(10, read_json(run.manifest)["n_chunks"])):
        bar = 0.8 * np.array(matplotlib.colors.to_rgb(f"C{cid}")) + 0.2
        hit = np.abs(pixels - bar).max(axis=-1) < 0.02
        assert hit.sum() > 50, f"no bar of chunk {cid}'s colour"
        rows[cid] = np.nonzero(hit)[0].mean()
    assert abs(rows[0] - rows[1]) > 20  # chunks 0 and 1 ran on w0 and w1: different lanes
