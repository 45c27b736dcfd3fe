"""What researchers report from a graded run: pass@1, pass@k, maj@k with standard errors,
the CS336 format/answer categories, all of it per group of a record field too.

Fed record by record at merge, after the grading hook (run/merge.py: Hook) has scored each
sampled output. A hook says which of its per-output fields is the score and which the
extracted answer (attributes `score_key`, `answer_key`, `format_key` on the function;
r1_zero_reward: answer_reward, extracted, format_reward).

- pass@1: the mean over records of each record's share of correct samples;
- pass@k (k = 1, 2, 4, ... <= n): the unbiased estimator of Chen et al. (2021),
  1 - C(n-c, k) / C(n, k) per record (n samples, c correct), averaged;
- maj@k: the most common extracted answer among a record's first k samples (a tie goes
  to the answer seen first), correct when a sample with that answer was graded correct;
- each with its standard error over records (sample standard deviation / sqrt(records));
- categories: counts of outputs by (format, answer) reward, (1, 1), (1, 0), (0, 0) as
  CS336's write-up asks, with a few example records of each;
- error records (what the engine refused, a poison record) count as records whose every
  sample failed (as many samples as the run's other records have): a refusal is not left
  out of the denominator, which would overstate every figure. `errors` says how many.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

EXAMPLES = 3  # example records kept per category


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k)/C(n, k), in the product form that stays
    exact in floating point (no huge binomials)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def powers_of_two(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks and ks[-1] != n:
        ks.append(n)  # k = n as well (pass@n: any sample correct)
    return ks


def mean_se(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < 2:
        return {"mean": round(mean, 6), "se": None}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": round(mean, 6), "se": round(math.sqrt(var / n), 6)}


def majority(answers: list[Any]) -> Any:
    """The most common answer; a tie goes to the one seen first. None never wins."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


class Tally:
    """Per-record outcomes of one group (or of the whole run)."""

    def __init__(self):
        self.samples: list[tuple[int, int]] = []  # (n, c) per record
        self.maj: dict[int, list[float]] = {}  # k -> per-record majority correctness
        self.categories: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}
        self.errors = 0  # error records: every sample failed (n decided at result())

    def add(
        self,
        record_id: Any,
        scores: list[float],
        answers: list[Any] | None,
        formats: list[float] | None,
        texts: list[str],
    ) -> None:
        n, c = len(scores), sum(1 for s in scores if s > 0)
        self.samples.append((n, c))
        if answers is not None:
            for k in powers_of_two(n):
                first = answers[:k]
                pick = majority(first)
                ok = pick is not None and any(a == pick and s > 0 for a, s in zip(first, scores[:k]))
                self.maj.setdefault(k, []).append(float(ok))
        if formats is not None:
            for f, s, text in zip(formats, scores, texts):
                key = f"format={int(f > 0)},answer={int(s > 0)}"
                self.categories[key] += 1
                kept = self.examples.setdefault(key, [])
                if len(kept) < EXAMPLES:
                    kept.append({"id": record_id, "text": (text or "")[:600]})

    def result(self) -> dict:
        if not self.samples and not self.errors:
            return {"records": 0}
        n_max = max([n for n, _ in self.samples] or [1])
        samples = self.samples + [(n_max, 0)] * self.errors
        out: dict[str, Any] = {
            "records": len(samples),
            "samples_per_record": n_max,
            "errors": self.errors,
            "pass@1": mean_se([c / n for n, c in samples if n]),
        }
        for k in powers_of_two(n_max):
            if k > 1:
                out[f"pass@{k}"] = mean_se([pass_at_k(n, c, k) for n, c in samples if n >= k])
        for k, values in self.maj.items():
            out[f"maj@{k}"] = mean_se(values + [0.0] * self.errors)
        if self.categories:
            out["categories"] = {
                key: self.categories.get(key, 0)
                for key in ("format=1,answer=1", "format=1,answer=0", "format=0,answer=0")
            }
            if self.categories.get("format=0,answer=1"):  # only a grader without a format check gives these
                out["categories"]["format=0,answer=1"] = self.categories["format=0,answer=1"]
            out["examples"] = self.examples
        return out


def field_value(record: dict, name: str) -> Any:
    """A record's value of `name`: its own field, else the input row's (`fields`)."""
    if name in record:
        return record[name]
    return (record.get("fields") or {}).get(name)


class Metrics:
    """The whole run's tally and one per value of each `group_by` field."""

    def __init__(self, score_key: str, answer_key: str | None, format_key: str | None, group_by: list[str]):
        self.score_key, self.answer_key, self.format_key = score_key, answer_key, format_key
        self.group_by = list(group_by)
        self.all = Tally()
        self.groups: dict[str, dict[str, Tally]] = {g: {} for g in self.group_by}

    def add(self, record: dict) -> None:
        outputs = record.get("outputs") or []
        if record.get("error"):  # a failed record: every sample wrong, in its groups too
            self.all.errors += 1
            for g in self.group_by:
                self.groups[g].setdefault(str(field_value(record, g)), Tally()).errors += 1
            return
        if not outputs or self.score_key not in outputs[0]:
            return
        scores = [float(o.get(self.score_key) or 0.0) for o in outputs]
        answers = [o.get(self.answer_key) for o in outputs] if self.answer_key else None
        formats = [float(o.get(self.format_key) or 0.0) for o in outputs] if self.format_key else None
        texts = [o.get("text") or "" for o in outputs]
        args = (record.get("id"), scores, answers, formats, texts)
        self.all.add(*args)
        for g in self.group_by:
            value = field_value(record, g)
            self.groups[g].setdefault(str(value), Tally()).add(*args)

    def result(self) -> dict:
        out = self.all.result()
        out["score"] = self.score_key
        if self.group_by:
            out["groups"] = {
                g: {v: t.result() for v, t in sorted(tallies.items())} for g, tallies in self.groups.items()
            }
        return out
