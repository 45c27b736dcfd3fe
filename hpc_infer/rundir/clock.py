"""Time, sleeps and random names for the run-directory protocol and the worker, behind one
seam: the real clocks everywhere (the wall clock and a monotonic one), a simulated node's clock and a seeded generator in the
protocol simulator (tests/simulation.py), so one seed replays one schedule exactly.
Standard library only."""

from __future__ import annotations

import random
import secrets
import time


class Clock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, s: float) -> None:
        time.sleep(s)

    def token(self, nbytes: int = 4) -> str:
        return secrets.token_hex(nbytes)

    def rng(self) -> random.Random:
        return random._inst  # the module's generator: samples of claims and heartbeats


REAL = Clock()
current: Clock = REAL


def now() -> float:
    return current.now()


def monotonic() -> float:
    """Seconds on a clock no step moves (NTP, a resumed VM): a process's own waits and
    intervals. `now()` is for times written down and compared across processes; a wait
    measured on it lasted the step longer (the protocol simulator's clock jumps found a
    worker that outlived its run, and a dead holder's chunk never taken over)."""
    return current.monotonic()


def time_ns() -> int:
    return int(current.now() * 1e9) if current is not REAL else time.time_ns()


def sleep(s: float) -> None:
    current.sleep(s)


def token(nbytes: int = 4) -> str:
    return current.token(nbytes)


def rng() -> random.Random:
    return current.rng()
