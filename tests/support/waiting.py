"""Waiting for a condition, the one way tests wait: poll a check until it holds, never sleep a fixed time.

    job = wait_until(lambda: store.get(job_id), timeout=10, what="the job stored")
    wait_until(lambda: len(seen) >= 2, timeout=30, what="two deliveries", diagnostics=stack.logs_tail)

The check's first truthy value is returned, so a wait can also fetch what it waited for. On timeout the test
fails (pytest.fail) with `what`, the last value the check returned and, if given, what `diagnostics()` says
(process logs, say): it is called only then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               diagnostics: Callable[[], object] | None = None, interval: float = 0.05) -> T:
    """Call check() every `interval` seconds until it returns something truthy; return that value.

    The check runs at least once (even with timeout=0), and the test fails only after a check that ended past
    the deadline came back falsy.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    last = repr(value)
    if len(last) > 500:
        last = last[:500] + "..."
    message = f"timed out after {timeout}s waiting for {what}; the check last returned {last}"
    if diagnostics is not None:
        message += f"\n{diagnostics()}"
    pytest.fail(message)
