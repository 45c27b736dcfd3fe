"""Evaluation metrics at merge (run/metrics.py): pass@1, unbiased pass@k, maj@k with
standard errors, the CS336 categories, per group; checked by hand and against the
estimator evaluated with exact fractions."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import compose, sh
from hpc_infer.run.metrics import Metrics, majority, pass_at_k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The definition: the chance that k samples drawn without replacement from n, c of them
    correct, hold at least one correct: 1 - C(n-c, k) / C(n, k), as a fraction."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The same by enumerating every k-subset (independent of the formula)."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 4, 5, 8, 16])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = exact_pass_at_k(n, c, k)
            assert abs(pass_at_k(n, c, k) - float(want)) < 1e-12, (n, c, k)
            if n <= 8:
                assert want == brute_pass_at_k(n, c, k)


def _record(i, scores, answers, formats, level):
    return {
        "id": f"p{i}",
        "fields": {"level": level},
        "outputs": [
            {"text": f"t{j}", "answer_reward": s, "extracted": a, "format_reward": f}
            for j, (s, a, f) in enumerate(zip(scores, answers, formats))
        ],
    }


def test_a_small_case_by_hand():
    """Three problems, four samples each:
    p0: correct, wrong, correct, wrong (answers 5, 6, 5, 7)  c=2
    p1: all wrong (answers 1, 2, 2, 3; the 2s wrong)         c=0
    p2: wrong, wrong, wrong, correct (answers 4, 4, 9, 8)    c=1
    pass@1 = mean(2/4, 0, 1/4) = 0.25; pass@2 = mean(1-C(2,2)/C(4,2), 0, 1-C(3,2)/C(4,2)) = mean(5/6, 0, 1/2)
    pass@4 = mean(1, 0, 1) = 2/3; maj@4: p0's majority 5 (correct), p1's 2 (wrong), p2's 4 (wrong): 1/3;
    maj@1 = the first sample: 1/3; maj@2: p0 tie 5/6 -> first, 5 correct; p1 tie -> 1 wrong; p2 4 wrong: 1/3."""
    m = Metrics("answer_reward", "extracted", "format_reward", ["level"])
    m.add(_record(0, [1, 0, 1, 0], ["5", "6", "5", "7"], [1, 1, 1, 0], "L1"))
    m.add(_record(1, [0, 0, 0, 0], ["1", "2", "2", "3"], [1, 0, 1, 1], "L2"))
    m.add(_record(2, [0, 0, 0, 1], ["4", "4", "9", "8"], [1, 1, 0, 1], "L2"))
    r = m.result()  # (error records count as failed: test_error_records_count_as_failed_samples_not_left_out)
    assert r["records"] == 3 and r["samples_per_record"] == 4
    assert r["pass@1"]["mean"] == pytest.approx(0.25)
    assert r["pass@2"]["mean"] == pytest.approx((5 / 6 + 0 + 1 / 2) / 3, abs=1e-6)
    assert r["pass@4"]["mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert [r[f"maj@{k}"]["mean"] for k in (1, 2, 4)] == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=1e-6)
    per = [0.5, 0.0, 0.25]
    se = math.sqrt(sum((x - 0.25) ** 2 for x in per) / 2 / 3)
    assert r["pass@1"]["se"] == pytest.approx(se, abs=1e-6)
    # outputs by (format, answer): correct ones all formatted here
    assert r["categories"] == {"format=1,answer=1": 3, "format=1,answer=0": 6, "format=0,answer=0": 3}
    assert [e["id"] for e in r["examples"]["format=1,answer=1"]] == ["p0", "p0", "p2"]
    g = r["groups"]["level"]
    assert g["L1"]["records"] == 1 and g["L1"]["pass@1"]["mean"] == pytest.approx(0.5)
    assert g["L2"]["records"] == 2 and g["L2"]["pass@1"]["mean"] == pytest.approx(0.125)
    assert g["L1"]["pass@1"]["se"] is None  # one record: no standard error


def test_majority_ties_go_to_the_first_seen_and_none_never_wins():
    assert majority(["b", "a", "a", "b"]) == "b"
    assert majority([None, None, "x"]) == "x"
    assert majority([None]) is None


def test_random_cases_against_exact_fractions():
    rng = random.Random(7)
    m = Metrics("answer_reward", None, None, [])
    cases = []
    for i in range(200):
        n = rng.choice([4, 8])
        scores = [float(rng.random() < 0.3) for _ in range(n)]
        cases.append((n, int(sum(scores))))
        m.add(_record(i, scores, [None] * n, [1] * n, "x"))
    r = m.result()
    for k in (1, 2, 4):
        want = sum(exact_pass_at_k(n, c, k) for n, c in cases) / len(cases)
        assert r[f"pass@{k}"]["mean"] == pytest.approx(float(want), abs=1e-6), k


def test_the_math_flow_reports_metrics_by_level_through_merge(tmp_path):
    """The r1_zero hook grades every sample; summary.json holds pass@k, maj@k and the
    categories, overall and per level (merge.group_by), and `hpc-infer merge` prints them."""
    from hpc_infer.rundir import encode_chunk_output, read_chunk_records, read_json, write_atomic
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(
        f"output_root={tmp_path}/runs", "data=math_r1_zero", "cluster=local", "sampling.n=4", "merge.group_by=[level]"
    )
    from omegaconf import OmegaConf

    run, _ = prepare(rc, plan_input(rc), "/m", OmegaConf.to_yaml(OmegaConf.structured(rc)))  # as launch writes it
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = []
        for r in read_chunk_records(run, cid):
            truth = r["fields"]["answer"]
            texts = (
                [
                    f"x </think> <answer>{truth}</answer>",
                    "x </think> <answer>0</answer>",
                    "no format",
                    f"y </think> <answer>{truth}</answer>",
                ]
                if r["index"] % 2 == 0
                else ["no"] * 4
            )
            rows.append(
                dict(
                    r,
                    text=texts[0],
                    outputs=[{"text": t, "num_tokens": 3, "finish_reason": "stop"} for t in texts],
                    prompt_tokens=1,
                    output_tokens=12,
                )
            )
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0))
    p = sh(tmp_path, f"hpc-infer merge {run.root}")
    assert p.returncode == 0, p.stderr
    m = json.loads((run.root / "summary.json").read_text())["postprocess"]["metrics"]
    assert m["records"] == 20 and m["pass@1"]["mean"] == pytest.approx(0.25)  # half the problems, 2 of 4 samples
    assert m["pass@4"]["mean"] == pytest.approx(0.5) and m["maj@4"]["mean"] == pytest.approx(0.5)
    assert m["categories"] == {"format=1,answer=1": 20, "format=1,answer=0": 10, "format=0,answer=0": 50}
    assert set(m["groups"]["level"]) == {"Level 1", "Level 2", "Level 3"}
    assert "pass@1 0.250" in p.stdout and "maj@4 0.500" in p.stdout, p.stdout
    assert sum(g["records"] for g in m["groups"]["level"].values()) == 20
    Path(tmp_path / "keep").write_text(str(run.root))


def test_error_records_count_as_failed_samples_not_left_out():
    """10% refused records must not turn 0.45 into 0.50: an error record is a record whose
    every sample failed, and the figure says how many there were."""
    from hpc_infer.run.metrics import Metrics

    m = Metrics("score", "answer", None, ["level"])
    for i in range(90):
        ok = i < 45
        m.add({"id": i, "level": "L1", "outputs": [{"score": float(ok), "answer": str(ok)}]})
    for i in range(10):
        m.add({"id": 100 + i, "level": "L2", "error": {"type": "refused"}})
    out = m.result()
    assert out["records"] == 100 and out["errors"] == 10
    assert out["pass@1"]["mean"] == 0.45 and out["maj@1"]["mean"] == 0.45
    assert out["groups"]["level"]["L2"]["pass@1"]["mean"] == 0.0
