"""Planning: token-balanced chunks, exactly-once coverage, resume and refusal."""

import json

import pytest

from conftest import compose
from hpc_infer.io.data import load_records
from hpc_infer.errors import UserError
from hpc_infer.run.plan import make_chunks, prepare
from hpc_infer.worker.rundir import read_json, read_jsonl


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
    run, resumed = prepare(rc, load_records(rc.data), "/models/m", "cfg: 1\n")
    assert not resumed
    m = read_json(run.manifest)
    assert m["n_records"] == 50 and m["n_chunks"] == len(m["chunks"]) > 1
    ids = [r["id"] for c in range(m["n_chunks"]) for r in read_jsonl(run.chunk_path(c))]
    assert sorted(ids) == sorted(d["id"] for d in lines)
    spec = read_json(run.worker_spec)
    assert spec["model"]["path"] == "/models/m" and spec["sampling"]["max_tokens"] == rc.sampling.max_tokens
    assert not any(p.name.startswith(".") for p in run.root.parent.iterdir())  # staging dir renamed away


def test_relaunch_same_input_resumes(tmp_path):
    lines = [{"prompt": f"p{i}"} for i in range(5)]
    rc = _rc(tmp_path, lines)
    prepare(rc, load_records(rc.data), "/m", "")
    _, resumed = prepare(rc, load_records(rc.data), "/m", "")
    assert resumed


def test_changed_input_or_sampling_is_refused(tmp_path):
    rc = _rc(tmp_path, [{"prompt": "a"}])
    prepare(rc, load_records(rc.data), "/m", "")
    (tmp_path / "in.jsonl").write_text('{"prompt": "b"}\n')
    with pytest.raises(UserError, match="different input file.*run_name"):
        prepare(rc, load_records(rc.data), "/m", "")
    rc2 = _rc(tmp_path, [{"prompt": "a"}], **{"sampling.temperature": 0.5})
    with pytest.raises(UserError, match="different sampling. Resuming"):
        prepare(rc2, load_records(rc2.data), "/m", "")
    # a cluster change is fine: resuming on other hardware is the point
    rc3 = _rc(tmp_path, [{"prompt": "a"}], **{"cluster.workers": 7})
    prepare(rc3, load_records(rc3.data), "/m", "")
