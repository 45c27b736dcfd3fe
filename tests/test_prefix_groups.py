"""Prefix-aware planning (run/plan.py: prefix_groups, regroup): records whose prompts share
their first 1,024 characters are planned into the same chunks; workers give each record its
own index, id and line back; the merge restores input order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import compose, read_results, run_launch
from hpc_infer.rundir import read_chunk_records, read_json

FAKE = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.001, "max_num_seqs": 8})}


def docs_and_questions(path: Path, docs: int, questions: int, shuffle: bool, ids: bool = True) -> list[dict]:
    rows = [
        {
            **({"id": f"d{d}q{q}"} if ids else {}),
            "prompt": f"Document {d}: " + f"the story of item {d} goes on. " * 60 + f"\nQuestion {q}: what is {q}?",
        }
        for d in range(docs)
        for q in range(questions)
    ]
    if shuffle:
        random.Random(3).shuffle(rows)
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            if i % 7 == 3:
                f.write("\n")  # blank lines keep their place in the line count
            f.write(json.dumps(r) + "\n")
    return rows


def _plan(tmp_path, data, *overrides):
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(
        f"output_root={tmp_path}/runs",
        f"data.path={data}",
        "cluster=local",
        "cluster.workers=2",
        "sampling=greedy",
        "sampling.max_tokens=4",
        *overrides,
    )
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    return run


@pytest.mark.parametrize("last_newline", [True, False], ids=["ends with a newline", "last line unterminated"])
def test_scattered_prefixes_are_grouped_into_chunks(tmp_path, last_newline):
    data = tmp_path / "in.jsonl"
    rows = docs_and_questions(data, docs=12, questions=6, shuffle=True)
    if not last_newline:
        data.write_bytes(data.read_bytes().rstrip(b"\n"))
    run = _plan(tmp_path, data)
    manifest = read_json(run.manifest)
    assert manifest["grouped"]["groups"] == 12 and manifest["grouped"]["records_in_shared_groups"] == 72
    seen, lines = {}, {}
    text = data.read_text().splitlines()
    for c in manifest["chunks"]:
        recs = read_chunk_records(run, c["id"])
        docs = [r["prompt"].split(":")[0] for r in recs]
        assert docs == sorted(docs, key=docs.index)  # each document's questions together
        for r in recs:
            seen[r["index"]] = r["id"]
        src = __import__("hpc_infer.rundir.chunks", fromlist=["x"]).read_chunk_source(
            run.fs, c, read_json(run.worker_spec)["input"]
        )
        for k, r in enumerate(src.records):
            lines[r["id"]] = src.parsed.record_lines[k]
    assert [seen[i] for i in range(72)] == [r["id"] for r in rows]  # each record its own index back
    for rid, line in lines.items():
        assert json.loads(text[line - 1])["id"] == rid  # and its own line in the input
    chunk_docs = [{r["prompt"].split(":")[0] for r in read_chunk_records(run, c["id"])} for c in manifest["chunks"]]
    assert sum(len(d) for d in chunk_docs) <= len(chunk_docs) + 12  # a document spans few chunks


@pytest.mark.parametrize("case", ["grouped input", "no shared prefix", "off"])
def test_nothing_is_regrouped_when_it_would_not_help(tmp_path, case):
    data = tmp_path / "in.jsonl"
    if case == "no shared prefix":
        data.write_text("".join(json.dumps({"prompt": f"{i} " + "x" * 2000}) + "\n" for i in range(50)))
    else:
        docs_and_questions(data, docs=8, questions=5, shuffle=case == "off")
    run = _plan(tmp_path, data, *(["data.group_prefixes=off"] if case == "off" else []))
    manifest = read_json(run.manifest)
    assert manifest["grouped"] is None and not (run.root / "order.bin").exists()


def test_a_grouped_run_merges_in_input_order_with_positional_ids(tmp_path):
    """Through launch (local workers, the FakeEngine): no id field, so ids are positions and
    must come back as each record's own; the results are in input order, each once."""
    data = tmp_path / "in.jsonl"
    rows = docs_and_questions(data, docs=10, questions=5, shuffle=True, ids=False)
    p = run_launch(
        tmp_path,
        "cluster=local",
        "cluster.workers=2",
        f"data.path={data}",
        "sampling=greedy",
        "sampling.max_tokens=3",
        "run_name=g",
        env=FAKE,
    )
    assert "grouped" in p.stderr, p.stderr[-2000:]
    results = read_results(tmp_path / "runs" / "g" / "results.jsonl")
    assert [r["id"] for r in results] == [str(i) for i in range(50)]
    assert [r["prompt"] for r in results] == [r["prompt"] for r in rows]
    for fmt in ("parquet", "openai_batch"):  # every writer takes the input-order blocks
        from hpc_infer.run.merge import merge
        from hpc_infer.rundir import RunDir

        s = merge(RunDir(tmp_path / "runs" / "g"), fmt)
        assert s.records == 50


def test_a_damaged_record_of_a_grouped_chunk_is_refused(tmp_path):
    """A grouped chunk's records are read one by one from input.copy (no copy in group
    order): each is checked against its own CRC in order.bin, so one changed byte in one
    record stops that chunk with the damaged-run error, naming the record."""
    from hpc_infer.rundir.chunks import read_chunk_source, read_order

    data = tmp_path / "in.jsonl"
    docs_and_questions(data, docs=12, questions=6, shuffle=True)
    run = _plan(tmp_path, data)
    manifest = read_json(run.manifest)
    assert run.input_copy.read_bytes() == data.read_bytes()  # the copy stays in input order
    chunk = manifest["chunks"][1]
    index, _line, start, end, _crc = read_order(run.fs, *chunk["positions"])[2]
    body = bytearray(run.input_copy.read_bytes())
    body[start + 20] ^= 1  # inside the prompt: still valid JSON
    run.input_copy.write_bytes(bytes(body))
    spec = read_json(run.worker_spec)["input"]
    with pytest.raises(RuntimeError, match=f"record {index} of chunk 1 .* does not match the plan's CRC"):
        read_chunk_source(run.fs, chunk, spec)
    read_chunk_source(run.fs, manifest["chunks"][0], spec)  # the other chunks read as planned


def test_grouped_chunks_read_back_every_record_of_a_bom_crlf_non_ascii_input(tmp_path):
    """Each record's byte range is its own line (a BOM before the first is not in it, a
    \\r\\n is): read back chunk by chunk, the records are exactly the ones read in one piece."""
    from hpc_infer.config import DataConfig
    from hpc_infer.io.data import load_records

    rows = docs_and_questions(tmp_path / "plain.jsonl", docs=9, questions=5, shuffle=True)
    text = "".join(
        ("\r\n" if i % 5 == 2 else "")
        + json.dumps(dict(r, prompt="Ünïcødé " + r["prompt"]), ensure_ascii=i % 2 == 0)
        + "\r\n"
        for i, r in enumerate(rows)
    )
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())
    run = _plan(tmp_path, data)
    manifest = read_json(run.manifest)
    assert manifest["grouped"]["groups"] == 9
    got = sorted((r for c in manifest["chunks"] for r in read_chunk_records(run, c["id"])), key=lambda r: r["index"])
    want = [r.to_json() for r in load_records(DataConfig(name="t", path=str(data)))]
    assert got == want
