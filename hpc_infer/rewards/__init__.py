"""Post-processing hooks for `merge.postprocess`: score each merged record.

A hook is any importable callable `fn(record, **kwargs) -> dict`; the dict's keys are
added to the record, and numeric ones are summed and averaged in summary.json. Named in
the config the Hydra way:

    merge:
      postprocess:
        _target_: hpc_infer.rewards.r1_zero_reward
        answer_field: answer

`r1_zero_reward` is CS336's r1_zero reward in its default mode (`math_grader.py`:
Hendrycks/Minerva normalisation and sympy, deterministic); `fast=False` adds the
reference's math-verify fallback. `math_verify_reward` grades with Hugging Face's
math-verify alone, for users who want that grader by name.
"""

from __future__ import annotations

from typing import Any, Callable

from .math_grader import extract_answer, hendrycks_normalize, r1_zero_score


def _truth(record: dict[str, Any], answer_field: str) -> Any:
    truth = (record.get("fields") or {}).get(answer_field)
    if truth is None:
        raise KeyError(f"record has no '{answer_field}' field to grade against (set answer_field=...)")
    return truth


def extracted(response: str) -> str | None:
    """The answer a response gives, normalized for a majority vote (maj@k): the text between
    `<answer>` and `</answer>` (a \\boxed{} inside it unwrapped), Hendrycks-normalized; None
    without one."""
    if "<answer>" not in response:
        return None
    answer = response.split("<answer>")[-1].split("</answer>")[0]
    if "\\boxed" in answer:
        answer = extract_answer(answer) or ""
    normal = hendrycks_normalize(answer.strip())
    return normal if normal else None


def _score_outputs(record: dict[str, Any], score: Callable[[str], dict[str, float]]) -> dict[str, float]:
    """Scores every sampled output (n >= 1); the record gets the mean, each output its own
    scores and its `extracted` answer (run/metrics.py reports pass@k and maj@k from them)."""
    outputs = record.get("outputs") or [{"text": record.get("text", "")}]
    scores = [score(o.get("text", "")) for o in outputs]
    for o, s in zip(outputs, scores):
        o.update(s, extracted=extracted(o.get("text") or ""))
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def r1_zero_reward(record: dict[str, Any], answer_field: str = "answer", fast: bool = True) -> dict[str, Any]:
    """CS336's `r1_zero_reward_fn(response, ground_truth, fast)` on every output of a record."""
    truth = _truth(record, answer_field)
    return _score_outputs(record, lambda text: r1_zero_score(text, truth, fast))


def math_verify_score(response: str, truth: str) -> dict[str, float]:
    """r1_zero format reward, answer graded by HF math-verify alone (its own timeouts apply)."""
    from math_verify import parse, verify

    if "</think> <answer>" not in response or "</answer>" not in response:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    answer = response.split("<answer>")[-1].replace("</answer>", "").strip()

    def as_math(s: str) -> str:
        s = s.strip()
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold, guess = parse(as_math(str(truth))), parse(as_math(answer))
    correct = bool(gold and guess and verify(gold, guess))
    return {"format_reward": 1.0, "answer_reward": float(correct), "reward": float(correct)}


def math_verify_reward(record: dict[str, Any], answer_field: str = "answer") -> dict[str, Any]:
    """The r1_zero format with math-verify's (more lenient, version-dependent) answer check."""
    truth = _truth(record, answer_field)
    return _score_outputs(record, lambda text: math_verify_score(text, truth))


# The record fields each hook reads (the names of its arguments that hold a field name): the
# planner refuses a record without them, with its line, before anything runs.
r1_zero_reward.field_args = ("answer_field",)
math_verify_reward.field_args = ("answer_field",)
# Each output's correctness, format and extracted answer: what summary.json's metrics use
# (run/metrics.py: pass@k, maj@k, the format/answer categories).
for _hook in (r1_zero_reward, math_verify_reward):
    _hook.score_key, _hook.format_key, _hook.answer_key = "answer_reward", "format_reward", "extracted"
