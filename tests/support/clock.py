"""Clocks for code that takes `clock=` (a callable returning epoch seconds) and `sleep=`.

FakeClock: moved by hand only.

    clock = FakeClock(1_700_000_000.0)
    store = JobStore(redis_client, clock=clock)
    clock.advance(60)            # or clock.now = ..., clock.now += ...
    limiter.acquire(sleep=clock.sleep)   # a "sleep" that only moves the clock

Every reading is exact (no real time passes), so timestamps can be compared with ==.

SkewedClock: the real time off by `offset` seconds, for code checked against a peer on the real clock.
"""

from __future__ import annotations

import time


class FakeClock:
    """Reads `now`; `advance(seconds)` and `sleep(seconds)` move it forward."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        """What code under test calls instead of time.sleep: the time passes at once."""
        self.advance(seconds)


class SkewedClock:
    """The real time plus `offset` seconds (a machine whose clock is off); the test changes `offset` at will."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset
