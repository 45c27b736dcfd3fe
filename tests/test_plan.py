"""Planning: token-balanced chunks, exactly-once coverage, resume and refusal."""

import json

import pytest

from conftest import compose

from hpc_infer.errors import UserError
from hpc_infer.run.plan import plan_input, make_chunks, prepare
from hpc_infer.rundir import read_chunk_records, read_json


def test_chunks_cover_every_record_once_in_order_largest_first():
    est = [10, 500, 20, 30, 1000, 5, 5, 5, 700, 40] * 20
    chunks = make_chunks(est, workers=4, chunks_per_worker=4)
    flat = [i for c in chunks for i in c]
    assert flat == list(range(len(est)))  # contiguous ranges, input order: the merge concatenates
    sizes = [sum(est[i] for i in c) for c in chunks]
    assert sizes[0] == max(sizes)  # claimed first
    assert sizes[-1] < sizes[0] / 2  # guided: the tail is small


def test_chunks_balance_tokens_not_counts():
    # A few huge records and many tiny ones: equal-count slices would be badly skewed.
    est = [10_000] * 8 + [10] * 992
    chunks = make_chunks(est, workers=8, chunks_per_worker=4)
    sizes = [sum(est[i] for i in c) for c in chunks]
    counts = [len(c) for c in chunks]
    assert max(counts) > 10 * min(counts)  # record counts differ wildly ...
    total = sum(est)
    assert max(sizes) <= total / 8  # ... while no chunk exceeds one worker's fair share


def _rc(tmp_path, data_lines, **extra):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in data_lines))
    overrides = [f"data.path={data}", f"output_root={tmp_path / 'runs'}", "cluster=debug", "run_name=r"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return compose(*overrides)


def test_prepare_writes_manifest_and_chunks(tmp_path):
    lines = [{"id": f"r{i}", "prompt": "x" * (i * 37 % 400 + 1)} for i in range(50)]
    rc = _rc(tmp_path, lines, **{"cluster.workers": 3})
    run, resumed = prepare(rc, plan_input(rc), "/models/m", "cfg: 1\n")
    assert not resumed
    m = read_json(run.manifest)
    assert m["n_records"] == 50 and m["n_chunks"] == len(m["chunks"]) > 1
    ids = [r["id"] for c in range(m["n_chunks"]) for r in read_chunk_records(run, c)]
    assert sorted(ids) == sorted(d["id"] for d in lines)
    spec = read_json(run.worker_spec)
    assert spec["model"]["path"] == "/models/m" and spec["sampling"]["max_tokens"] == rc.sampling.max_tokens
    assert not any(p.name.startswith(".") for p in run.root.parent.iterdir())  # staging dir renamed away


def test_relaunch_same_input_resumes(tmp_path):
    lines = [{"prompt": f"p{i}"} for i in range(5)]
    rc = _rc(tmp_path, lines)
    prepare(rc, plan_input(rc), "/m", "")
    _, resumed = prepare(rc, plan_input(rc), "/m", "")
    assert resumed


def test_changed_input_or_sampling_is_refused(tmp_path):
    rc = _rc(tmp_path, [{"prompt": "a"}])
    prepare(rc, plan_input(rc), "/m", "")
    (tmp_path / "in.jsonl").write_text('{"prompt": "b"}\n')
    with pytest.raises(UserError, match="different input file.*run_name"):
        prepare(rc, plan_input(rc), "/m", "")
    rc2 = _rc(tmp_path, [{"prompt": "a"}], **{"sampling.temperature": 0.5})
    with pytest.raises(UserError, match="different sampling. Resuming"):
        prepare(rc2, plan_input(rc2), "/m", "")
    # a cluster change is fine: resuming on other hardware is the point
    rc3 = _rc(tmp_path, [{"prompt": "a"}], **{"cluster.workers": 7})
    prepare(rc3, plan_input(rc3), "/m", "")


# --- planning in one pass: chunks are the input's own bytes, rebuilt by the worker -----------


def _write(path, rows, crlf=False, bom=False, blank_every=0):
    nl = "\r\n" if crlf else "\n"
    out = "\ufeff" if bom else ""
    for i, r in enumerate(rows):
        out += (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + nl
        if blank_every and i % blank_every == 0:
            out += "  " + nl
    path.write_text(out, encoding="utf-8")
    return path


def _plan_all(tmp_path, data, *extra, parallel=True):
    rc = compose(f"data.path={data}", f"output_root={tmp_path / 'runs'}", "cluster=debug", "cluster.workers=5", *extra)
    run, _ = prepare(rc, plan_input(rc, parallel=parallel), "/m", "")
    m = read_json(run.manifest)
    return run, m, [r for c in range(m["n_chunks"]) for r in read_chunk_records(run, c)]


@pytest.mark.parametrize("crlf, bom", [(False, False), (True, True)])
def test_chunks_are_the_inputs_bytes_and_the_worker_rebuilds_each_record(tmp_path, crlf, bom):
    from hpc_infer.io.data import load_records

    rows = [{"id": f"q{i}", "problem": f"{i} + {i}\u2028= ?" + "x" * (i % 17), "answer": i} for i in range(300)]
    data = _write(tmp_path / "in.jsonl", rows, crlf=crlf, bom=bom, blank_every=7)
    extra = ["data.prompt_field=problem", "data.template='Q: {question} ({answer})'"]
    run, m, rebuilt = _plan_all(tmp_path, data, *extra)
    raw = data.read_bytes()
    copy = run.input_copy.read_bytes()
    assert copy == raw[3 if bom else 0 :]  # a byte copy of the input (no re-encoding), BOM left out
    assert [(c["offset"], c["offset"] + c["bytes"]) for c in m["chunks"]] == list(
        zip([0] + [c["offset"] + c["bytes"] for c in m["chunks"][:-1]], [c["offset"] + c["bytes"] for c in m["chunks"]])
    )
    rc = compose(f"data.path={data}", *extra)
    assert rebuilt == [r.to_json() for r in load_records(rc.data)]  # the worker's records are the checked ones
    assert rebuilt[1] == {"id": "q1", "index": 1, "prompt": "Q: 1 + 1\u2028= ?x (1)", "fields": {"answer": 1}}


@pytest.mark.parametrize(
    "name, body, extra",
    [
        ("p.txt", "one\n\n two \fthree\nfour\n", []),
        ("p.csv", '\ufeffid,question\nq1,"What,\nnow?"\nq2,Why?\n', ["data.prompt_field=question"]),
        (
            "b.jsonl",
            "".join(
                json.dumps(
                    {
                        "custom_id": f"c{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"messages": [{"role": "user", "content": f"hi {i}"}], "temperature": i / 10},
                    }
                )
                + "\n"
                for i in range(4)
            ),
            [],
        ),
    ],
)
def test_every_format_plans_to_what_load_records_reads(tmp_path, name, body, extra):
    from hpc_infer.io.data import load_records

    data = tmp_path / name
    data.write_text(body, encoding="utf-8")
    _, m, rebuilt = _plan_all(tmp_path, data, *extra)
    assert rebuilt == [r.to_json() for r in load_records(compose(f"data.path={data}", *extra).data)]
    assert m["n_records"] == len(rebuilt) > 1


def test_parallel_scan_plans_exactly_as_one_process(tmp_path, monkeypatch):
    from hpc_infer.io import data as data_mod

    monkeypatch.setattr(data_mod, "BLOCK", 4096)  # many blocks from a small file
    monkeypatch.setattr(data_mod, "_scan_processes", lambda size: 2)
    data = _write(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": "p" * (i % 300 + 1)} for i in range(3000)])
    plans = []
    for parallel in (False, True):
        run, m, rebuilt = _plan_all(tmp_path / str(parallel), data, "data.limit=2500", parallel=parallel)
        plans.append((m["chunks"], m["fingerprint"], m["input_bytes"], rebuilt))
    assert plans[0] == plans[1]
    # every 300th prompt repeats, so the records are planned in prefix groups (the same in both)
    planned = plans[0][3]
    assert [r["id"] for r in sorted(planned, key=lambda r: r["index"])] == [f"r{i}" for i in range(2500)]
    assert [r["id"] for r in planned[:3]] == ["r0", "r300", "r600"]


def test_errors_name_the_line_from_any_block(tmp_path, monkeypatch):
    from hpc_infer.io import data as data_mod

    monkeypatch.setattr(data_mod, "BLOCK", 4096)
    monkeypatch.setattr(data_mod, "_scan_processes", lambda size: 2)
    rows = [{"id": f"r{i}", "prompt": "p" * 50} for i in range(2000)]
    rows[1500]["id"] = "r7"
    data = _write(tmp_path / "in.jsonl", rows)
    with pytest.raises(UserError, match=r"line 1501: duplicate id 'r7' \(first seen at record 8\)"):
        _plan_all(tmp_path, data)
    rows[1500] = {"prompt": "no id"}
    _write(data, rows)
    with pytest.raises(UserError, match="line 1501: has no 'id' field unlike the first record"):
        _plan_all(tmp_path, data)
    assert not (tmp_path / "runs").exists()  # nothing left behind by a refused plan
