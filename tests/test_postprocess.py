"""Merge hooks: the CS336 r1_zero reward, totals in summary.json, clear failures."""

import json

import pytest

from conftest import compose

from hpc_infer.errors import UserError
from hpc_infer.run.merge import merge
from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rewards.math_grader import r1_zero_score
from hpc_infer.rundir import read_chunk_records, encode_chunk_output, read_json, write_atomic


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("2+2 is 4.</think> <answer>4</answer>", "4", (1, 1)),
        ("so it is</think> <answer>\\boxed{\\frac{5}{6}}</answer>", "\\frac{5}{6}", (1, 1)),
        ("so it is</think> <answer>\\boxed{\\frac{10}{12}}</answer>", "\\frac{5}{6}", (1, 0)),  # unreduced: no credit
        ("thinking</think> <answer>5</answer>", "4", (1, 0)),
        ("the answer is 4", "4", (0, 0)),  # right answer, wrong format: no credit
        ("</think><answer>4</answer>", "4", (0, 0)),  # the space is part of the format
    ],
)
def test_r1_zero_score(response, truth, expected):
    s = r1_zero_score(response, truth)
    assert (s["format_reward"], s["answer_reward"]) == expected


def _math_run(tmp_path, answers):
    """A planned MATH run whose chunk outputs hold the given responses, as a worker writes them."""
    rc = compose("data=math_r1_zero", "data.limit=6", "cluster=debug", f"output_root={tmp_path / 'runs'}")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = [
            dict(r, text=answers(r), outputs=[{"text": answers(r)}], prompt_tokens=1, output_tokens=1)
            for r in read_chunk_records(run, cid)
        ]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows))
    return rc, run


def test_math_run_gets_reward_counts_in_summary(tmp_path):
    def answers(r):  # well-formed and right for even indices, well-formed and wrong for odd
        return f"ok</think> <answer>{r['fields']['answer'] if r['index'] % 2 == 0 else 'nope'}</answer>"

    rc, run = _math_run(tmp_path, answers)
    assert rc.postprocess["_target_"] == "hpc_infer.rewards.r1_zero_reward"  # the data set's default
    s = merge(run, postprocess=rc.postprocess)
    assert s.postprocess["records"] == 6
    assert s.postprocess["sums"] == {"format_reward": 6.0, "answer_reward": 3.0, "reward": 3.0}
    assert read_json(run.summary)["postprocess"]["means"]["answer_reward"] == 0.5
    rows = [json.loads(line) for line in open(s.results)]
    assert [r["answer_reward"] for r in rows] == [1.0, 0.0] * 3
    assert rows[0]["outputs"][0]["format_reward"] == 1.0


def test_parquet_merge_applies_the_hook_once(tmp_path, monkeypatch):
    """Once per record, counted: the parquet merge parses and grades each chunk one time."""
    import pyarrow.parquet as pq

    import hpc_infer.rewards as rewards

    calls, real = [], rewards.r1_zero_reward

    def counted(record, **kwargs):
        calls.append(record["id"])
        return real(record, **kwargs)

    counted.field_args = real.field_args
    monkeypatch.setattr(rewards, "r1_zero_reward", counted)  # where the hook's _target_ is looked up
    rc, run = _math_run(tmp_path, lambda r: "no format")
    s = merge(run, fmt="parquet", postprocess=rc.postprocess)
    assert sorted(calls) == sorted(r["id"] for r in pq.read_table(s.results).to_pylist()) and len(calls) == 6
    assert s.postprocess["records"] == 6 and s.postprocess["sums"]["format_reward"] == 0.0
    assert pq.read_table(s.results).column("format_reward").to_pylist() == [0.0] * 6


def test_failing_hook_names_the_record_and_leaves_no_result(tmp_path):
    rc, run = _math_run(tmp_path, lambda r: "x</think> <answer>1</answer>")
    with pytest.raises(UserError, match=r"r1_zero_reward failed on record 'sample/000.json' .*no 'solution' field"):
        merge(run, postprocess={"_target_": "hpc_infer.rewards.r1_zero_reward", "answer_field": "solution"})
    assert not (run.root / "results.jsonl").exists()


def test_unloadable_hook_refused_before_submission(tmp_path):
    with pytest.raises(UserError, match=r"merge.postprocess._target_=nosuch.module.fn: cannot be loaded"):
        compose("merge.postprocess={_target_: nosuch.module.fn}")
    rc = compose("data=math_r1_zero", "merge.postprocess={}")
    assert rc.postprocess is None  # a data set's grader can be turned off
