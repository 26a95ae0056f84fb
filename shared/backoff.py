"""Retry delays: exponential back-off with full jitter, capped."""

from __future__ import annotations

import random


def backoff_seconds(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [base/2, min(cap, base * 2**(attempt-1))].

    The lower bound keeps a retry from landing immediately after a rate-limit answer; the jitter spreads the
    retries of many jobs that failed together.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(cap, base * (2 ** min(attempt - 1, 32)))
    floor = min(base / 2, ceiling)
    return (rng or random).uniform(floor, ceiling)
