"""worker/finish.py: how long a worker's running records should take to finish (the end
of the launcher's ETA), from the lengths it has seen finish and its steps a second."""

from hpc_infer.worker.finish import FinishEstimate


def test_a_record_running_past_every_finish_seen_takes_the_lindy_tail_to_its_cap():
    """Five records finished at 10 tokens, one still running at 50 (max_tokens 100): past
    the longest seen, P(L > 50 + r | L > 50) = 50 / (50 + r), cut at the cap: 50 ln 2 more
    tokens. At the cap already: none."""
    f = FinishEstimate()
    for _ in range(5):
        f.finished(10)
    assert abs(f.tokens_left([(50, 100)]) - 50 * 0.693147) < 0.05 * 50 * 0.693147
    assert f.tokens_left([(100, 100)]) == 0.0
    assert f.tokens_left([]) == 0.0


def test_records_still_running_count_as_long_ones_not_as_missing():
    """Kaplan-Meier: 9 records finished at 4 tokens and 9 still running at 20. Counting only
    the finished ones, a fresh record would need 4 tokens; with the running ones as at least
    20 long, half the mass is past 20 and the fresh record's expected need is far more."""
    f = FinishEstimate()
    for _ in range(9):
        f.finished(4)
    fresh = f.tokens_left([(0, 1000)])
    with_running = f.tokens_left([(0, 1000)] + [(20, 1000)] * 9)
    assert 3.5 < fresh <= 4.0  # every length seen was 4
    assert with_running > 100  # nine records past 20 and running: the longest of ten needs far more


def test_the_longest_of_many_needs_more_than_the_longest_of_one():
    f = FinishEstimate()
    for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89) * 3:
        f.finished(n)
    one, many = f.tokens_left([(0, 200)]), f.tokens_left([(0, 200)] * 16)
    assert one < many <= 200


def test_seconds_left_costs_each_step_by_its_batch_and_forgets_an_idle_gap():
    """Steps of a + c x batch seconds (fitted over the window): the steps left cost a each
    and the record-steps c each, so a batch that empties steps faster. An engine idle for
    longer than the window (its chunks done, then a backup copy) starts again instead of
    dividing by the idle minutes. Unknown before any record finished."""
    f = FinishEstimate(window_s=30.0)
    t = 0.0
    f.stepped(t, 8)
    for batch in (8, 8, 6, 4, 4, 2, 1, 1):
        t += 0.5 + 0.1 * batch
        f.stepped(t, batch)
    a, c = f.step_cost()
    assert abs(a - 0.5) < 1e-9 and abs(c - 0.1) < 1e-9
    running = [(5, 10), (2, 10)]
    assert f.seconds_left(running, t) is None  # no length seen yet
    f.finished(10)
    steps, record_steps = f._integrals(running)
    assert 0 < steps <= record_steps and abs(f.seconds_left(running, t) - (0.5 * steps + 0.1 * record_steps)) < 1e-9
    f.stepped(t + 500, 2)
    assert f.seconds_left(running, t + 500) is None  # one step since the gap: nothing to go on yet
    f.stepped(t + 501, 2)
    assert f.step_cost() == (1.0, 0.0)  # one batch size seen: its mean
    assert f.seconds_left([], t + 501) == 0.0


def test_a_fit_that_makes_the_tail_free_falls_back_to_the_mean_step():
    """Prefill steps at a batch of 20 (slow) and decodes at 18 (fast) fit a steep slope
    with a negative intercept: as if the tail's steps cost nothing. The real run this was
    seen on (data=math_r1_zero on the CPU model) then showed 24 s where 160 s were left. The
    mean step, the batch not counted, is used instead."""
    f = FinishEstimate(window_s=60.0)
    t = 0.0
    f.stepped(t, 20)
    for batch, d in [(20, 2.0), (20, 2.0), (18, 0.17), (18, 0.17), (18, 0.17), (18, 0.17)]:
        t += d
        f.stepped(t, batch)
    a, c = f.step_cost()
    assert c == 0.0 and abs(a - (4.0 + 4 * 0.17) / 6) < 1e-9
