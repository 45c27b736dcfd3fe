"""Post-processing hooks for `merge.postprocess`: score each merged record.

A hook is any importable callable `fn(record, **kwargs) -> dict`; the dict's keys are
added to the record, and numeric ones are summed and averaged in summary.json. Named in
the config the Hydra way:

    merge:
      postprocess:
        _target_: hpc_infer.rewards.r1_zero_reward
        answer_field: answer

`r1_zero_reward` is the CS336 MATH evaluation: format reward (the response closes its
reasoning with "</think> <answer>" and ends with "</answer>") and answer reward (the
answer, or its \\boxed{} part, is mathematically equal to the ground truth, decided by
Hugging Face's math-verify).
"""

from __future__ import annotations

from typing import Any


def _answer_matches(answer: str, truth: str) -> bool:
    from math_verify import parse, verify

    def as_math(s: str) -> str:
        s = s.strip()
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold, guess = parse(as_math(truth)), parse(as_math(answer))
    return bool(gold and guess and verify(gold, guess))


def r1_zero_score(response: str, truth: str) -> dict[str, float]:
    """CS336's r1_zero_reward_fn: format first; only a well-formed answer is graded."""
    if "</think> <answer>" not in response or "</answer>" not in response:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    answer = response.split("<answer>")[-1].replace("</answer>", "").strip()
    correct = _answer_matches(answer, str(truth))
    return {"format_reward": 1.0, "answer_reward": float(correct), "reward": float(correct)}


def r1_zero_reward(record: dict[str, Any], answer_field: str = "answer") -> dict[str, Any]:
    """Scores every sampled output (n >= 1); the record gets the mean, each output its own."""
    truth = (record.get("fields") or {}).get(answer_field)
    if truth is None:
        raise KeyError(f"record has no '{answer_field}' field to grade against (set answer_field=...)")
    outputs = record.get("outputs") or [{"text": record.get("text", "")}]
    scores = [r1_zero_score(o.get("text", ""), truth) for o in outputs]
    for o, s in zip(outputs, scores):
        o.update(s)
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
