"""The CS336 r1_zero grader (math_grader.py) against the reference's documented behaviour.

Expected values are what `r1_zero_reward_fn` (stanford-cs336/assignment5-alignment,
cs336_alignment/drgrpo_grader.py, default fast=True) returns for each pair: the
Hendrycks MATH normalisation, then Minerva-style normalisation with sympy, integers and
plain fractions compared literally, tuples/intervals element-wise and in order.
"""

import pytest

from hpc_infer.rewards.math_grader import extract_answer, grade, hendrycks_normalize, minerva_normalize, r1_zero_score
from hpc_infer.rewards import math_verify_score, r1_zero_reward

CASES = [
    ("ok</think> <answer>4</answer>", "4", (1, 1)),
    ("ok</think> <answer>\\boxed{\\frac{10}{12}}</answer>", "\\frac{5}{6}", (1, 0)),
    ("ok</think> <answer>\\frac{5}{6}</answer>", "\\frac{5}{6}", (1, 1)),
    ("ok</think> <answer>5/6</answer>", "\\frac{5}{6}", (1, 1)),
    ("ok</think> <answer>\\$18.90</answer>", "\\$18.90", (1, 1)),
    ("ok</think> <answer>18.90</answer>", "\\$18.90", (1, 1)),
    ("ok</think> <answer>3!</answer>", "6", (1, 0)),
    ("ok</think> <answer>\\sqrt{4}</answer>", "2", (1, 0)),
    ("ok</think> <answer>2^{10}</answer>", "1024", (1, 0)),
    ("ok</think> <answer>4, 3</answer>", "3, 4", (1, 0)),
    ("ok</think> <answer>x+1</answer>", "f(x)=x+1", (1, 0)),
    ("ok</think> <answer>0.3333333</answer>", "\\frac{1}{3}", (1, 0)),
    ("ok</think> <answer>0.1</answer>", "10\\%", (1, 0)),
    ("ok</think> <answer>10</answer>", "10\\%", (1, 1)),
    ("ok</think> <answer>The answer is 4</answer>", "4", (1, 0)),
    ("ok</think> <answer>\\boxed{3} or \\boxed{4}</answer>", "4", (1, 1)),
    ("ok</think> <answer>\\[4\\]</answer>", "4", (1, 1)),
    ("ok</think> <answer>(1, 2]</answer>", "(1,2]", (1, 1)),
    ("ok</think> <answer>[1,2]</answer>", "(1,2]", (1, 0)),
    ("ok</think> <answer>2\\sqrt{3}</answer>", "\\sqrt{12}", (1, 1)),
    ("ok</think> <answer>\\sqrt{12}</answer>", "2\\sqrt{3}", (1, 1)),
    ("ok</think> <answer>1+x</answer>", "x+1", (1, 1)),
    ("ok</think> <answer>1,000</answer>", "1000", (1, 1)),
    ("ok</think> <answer>\\text{(B)}</answer>", "\\text{(B)}", (1, 1)),
    ("ok</think> <answer>B</answer>", "\\text{(B)}", (1, 1)),
    ("ok</think> <answer>90</answer>", "90^\\circ", (1, 1)),
    ("ok</think> <answer>5</answer>", "5 \\text{ cm}", (1, 1)),
    ("ok</think> <answer>\\frac34</answer>", "\\frac{3}{4}", (1, 1)),
    ("ok</think> <answer>0.5</answer>", "\\frac{1}{2}", (1, 1)),
    ("ok</think> <answer>12</answer>", "#### 12", (1, 1)),
    ("ok</think> <answer>\\fbox{4}</answer>", "4", (1, 1)),
    ("ok</think> <answer>\\boxed{4</answer>", "4", (1, 0)),
    ("ok</think><answer>4</answer>", "4", (0, 0)),
    ("the answer is 4", "4", (0, 0)),
    ("ok</think> <answer>4</answer>", 4, (1, 1)),
    ("ok</think> <answer>2.5</answer>", 2.5, (1, 1)),
    ("ok</think> <answer>7</answer>", ["6", "7"], (1, 1)),
    ("ok</think> <answer>(3, \\frac{\\pi}{2})</answer>", "\\left( 3, \\frac{\\pi}{2} \\right)", (1, 1)),
    ("ok</think> <answer>-\\frac{1}{3}</answer>", "-\\frac{1}{3}", (1, 1)),
    ("ok</think> <answer>-1/3</answer>", "-\\frac{1}{3}", (1, 1)),
    ("ok</think> <answer>\\pi/4</answer>", "\\frac{\\pi}{4}", (1, 1)),
    ("ok</think> <answer>(x+1)^2</answer>", "x^2+2x+1", (1, 1)),
]


@pytest.mark.parametrize("response, truth, expected", CASES)
def test_matches_reference(response, truth, expected):
    s = r1_zero_score(response, truth)
    assert (s["format_reward"], s["answer_reward"]) == expected
    assert s["reward"] == s["answer_reward"]


def test_normalisers_follow_the_papers_steps():
    assert hendrycks_normalize("\\dfrac12") == "\\frac{1}{2}"
    assert hendrycks_normalize("\\sqrt3") == "\\sqrt{3}"
    assert hendrycks_normalize("x = 3/4") == "\\frac{3}{4}"
    assert hendrycks_normalize("\\left( 1, 2 \\right)") == "(1,2)"
    assert hendrycks_normalize("\\frac") == "\\frac"  # unhandled form: compared as written
    assert minerva_normalize("1,000,000") == "1000000"
    assert minerva_normalize("\\text{Blue}") == "blue"
    assert minerva_normalize("Monday") == "mon"  # the reference strips "day" as a unit; so do we
    assert minerva_normalize("5 meters") == "5"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and then \\boxed{7}") == "7"
    assert extract_answer("#### 42") == "42"
    assert extract_answer("no answer") is None


def test_grade_is_deterministic_and_load_independent():
    # no timeout anywhere in the default path: the same pair gets the same grade every time
    pairs = [("(x+1)^2", "x^2+2x+1"), ("\\sqrt{12}", "2\\sqrt{3}"), ("0.3333333", "\\frac{1}{3}")]
    results = {p: {grade(*p) for _ in range(5)} for p in pairs}
    assert results == {pairs[0]: {True}, pairs[1]: {True}, pairs[2]: {False}}


def test_hook_scores_every_output_and_fast_false_is_at_least_as_lenient():
    rec = {
        "fields": {"answer": "\\frac{1}{3}"},
        "outputs": [{"text": "a</think> <answer>\\frac{1}{3}</answer>"}, {"text": "b</think> <answer>x</answer>"}],
    }
    assert r1_zero_reward(rec) == {"format_reward": 1.0, "answer_reward": 0.5, "reward": 0.5}
    assert rec["outputs"][0]["answer_reward"] == 1.0 and rec["outputs"][1]["answer_reward"] == 0.0
    assert r1_zero_score("a</think> <answer>1/3</answer>", "\\frac{1}{3}", fast=False)["answer_reward"] == 1.0


def test_math_verify_is_a_separate_named_grader():
    # math-verify accepts unreduced fractions; the r1_zero reference does not
    response = "ok</think> <answer>\\frac{10}{12}</answer>"
    assert math_verify_score(response, "\\frac{5}{6}")["answer_reward"] == 1.0
    assert r1_zero_score(response, "\\frac{5}{6}")["answer_reward"] == 0.0
