"""When the records a worker has running should all have finished: the end of the ETA.

A rate of records finished per second predicts the middle of a run and misses its end.
With heavy-tailed output lengths the records that finish first are the short ones, and
the last ones left are long, each getting one token per engine step however empty the
batch. So each worker estimates how many more steps the longest of its running records
needs, in expectation, each at its own engine's recent step time for the batch it will
carry (a step costs a + c x batch, fitted over the last minute).

The lengths come from the records this worker finished, with the running ones counted as
at least as long as they got (Kaplan-Meier: a long record still running is not left out
of the estimate only because it has not finished). Past the longest finish seen, nothing
is known: the estimate goes on with a Pareto tail of index 1 (a record that ran y tokens
is as likely as not to run y more, the Lindy rule: heavier than LLM lengths usually are,
so the end is over- rather than under-estimated; an index measured on the longest
lengths seen, Hill's estimator, was tried and under-estimated, being blind to the long
records still running), cut at the record's max_tokens, which it cannot pass. Standard
library only.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter, deque

GRID = 64  # points of the integrals: about 30 ms a beat at 256 running records of distinct ages


class FinishEstimate:
    """Output lengths finished, engine steps taken; `seconds_left` for the records running."""

    def __init__(self, window_s: float = 60.0):
        self.lengths: Counter[int] = Counter()
        self.window_s = window_s
        self.steps: deque[tuple[float, int]] = deque()  # (monotonic time a step ended, its batch)
        self.n_finished = 0

    def finished(self, output_tokens: int) -> None:
        self.lengths[max(1, int(output_tokens))] += 1
        self.n_finished += 1

    def stepped(self, now: float, batch: int = 1) -> None:
        """A step of `batch` running records ended at `now`."""
        if self.steps and now - self.steps[-1][0] > self.window_s:
            self.steps.clear()  # idle since (its chunks done, a backup copy now): a rate from now
        self.steps.append((now, batch))
        while len(self.steps) > 2 and now - self.steps[1][0] > self.window_s:
            self.steps.popleft()

    def step_cost(self) -> tuple[float, float] | None:
        """A step's seconds as a + c x its batch (least squares over the window): a batch
        that empties steps faster. While the batch has not changed, or where the fit says
        a step would cost nothing or less with fewer records (a few long prefill steps among
        decodes do: vLLM's step is mostly fixed cost), c is 0 and a the mean step."""
        s = list(self.steps)
        if len(s) < 2:
            return None
        pts = [(b[1], b[0] - a[0]) for a, b in zip(s, s[1:])]
        n = len(pts)
        mb, md = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
        var = sum((p[0] - mb) ** 2 for p in pts)
        c = sum((p[0] - mb) * (p[1] - md) for p in pts) / var if var > 1e-9 else 0.0
        a = md - c * mb
        if c < 0 or a < 0:  # noise (a prefill step among decodes): the mean step, the long side
            a, c = md, 0.0
        return a, c

    def tokens_left(self, running: list[tuple[int, int | None]]) -> float:
        """The expected tokens the longest of `running` (tokens so far, max_tokens or None)
        still needs: the integral over r of P(some record needs more than r)."""
        return self._integrals(running)[0]

    def _integrals(self, running: list[tuple[int, int | None]]) -> tuple[float, float]:
        """E[steps until the last of `running` ends] (the integral over r of P(some record
        needs more than r)) and E[record-steps until then] (of the expected count needing
        more than r: the batch the remaining steps carry)."""
        if not running:
            return 0.0, 0.0
        xs = sorted(self.lengths)
        gs = sorted(g for g, _ in running)
        above = self.n_finished  # finished records with length >= x
        surv, s = [], 1.0  # P(length > x) at each finished length x
        for x in xs:
            at_risk = above + len(gs) - bisect_left(gs, x)
            s *= 1.0 - self.lengths[x] / at_risk
            surv.append(s)
            above -= self.lengths[x]
        longest = xs[-1] if xs else 0
        last = surv[-1] if surv else 1.0

        def over(y: float) -> float:  # P(length > y), before any cap
            if y > longest:  # past every finish seen: a Pareto tail of index 1
                return last * min(1.0, max(longest, 1) / y)
            i = bisect_right(xs, y)
            return surv[i - 1] if i else 1.0

        groups = Counter(running)
        ends = {}  # (g, cap) -> the length past which none of this group runs
        for g, cap in groups:
            # a record with no max_tokens (rare: vLLM's is the context's end) past every finish
            # seen: twice what is known, a guess, not a bound
            ends[g, cap] = cap if cap is not None else 2 * max(g, longest, 1)
        r_max = max(ends[k] - k[0] for k in groups)
        if r_max <= 0:
            return 0.0, 0.0
        grid = [0.0] + [r_max ** (i / GRID) for i in range(GRID + 1)]
        base = {k: over(k[0]) for k in groups}

        def over_r(r: float) -> tuple[float, float]:  # P(some record needs more than r), E[how many do]
            p_none, count = 1.0, 0.0
            for (g, cap), n in groups.items():
                end = ends[g, cap]
                left = 0.0 if g + r >= end else over(g + r) / base[g, cap]
                p_none *= (1.0 - left) ** n
                count += n * left
            return 1.0 - p_none, count

        ps = [over_r(r) for r in grid]
        return tuple(  # type: ignore[return-value]
            sum((b - a) * (pa[k] + pb[k]) / 2 for a, b, pa, pb in zip(grid, grid[1:], ps, ps[1:])) for k in (0, 1)
        )

    def seconds_left(self, running: list[tuple[int, int | None]], now: float) -> float | None:
        """The steps until the last running record ends (one token each a step), each at
        this engine's recent cost for the batch it carries (`step_cost`); None before it has
        steps to go on or has seen a record finish."""
        if not running:
            return 0.0
        cost = self.step_cost()
        if cost is None or not self.lengths or now - self.steps[-1][0] > self.window_s:
            return None
        steps, record_steps = self._integrals(running)
        return cost[0] * steps + cost[1] * record_steps
