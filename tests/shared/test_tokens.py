from __future__ import annotations

import random

import pytest

from kling_relay.shared.backoff import backoff_seconds
from kling_relay.shared.settings import Secret
from kling_relay.shared.tokens import bearer_ok, callback_token, callback_token_ok

SECRET = Secret("callback-secret-0123456789")


def test_callback_token_is_per_job_and_checked() -> None:
    token = callback_token(SECRET, "job_a")
    assert len(token) == 64 and token != callback_token(SECRET, "job_b")
    assert callback_token_ok(SECRET, "job_a", token)
    assert not callback_token_ok(SECRET, "job_b", token)
    assert not callback_token_ok(Secret("another-secret-0123456789"), "job_a", token)
    assert not callback_token_ok(SECRET, "job_a", None)
    assert not callback_token_ok(SECRET, "job_a", "")
    assert not callback_token_ok(SECRET, "job_a", token[:-1])
    assert not callback_token_ok(SECRET, "job_a", "é" * 64)


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer token-aaaaaaaaaaaaaaaa", True),
    ("Bearer token-bbbbbbbbbbbbbbbb", True),
    ("Bearer  token-aaaaaaaaaaaaaaaa ", True),
    ("bearer token-aaaaaaaaaaaaaaaa", True),
    ("BEARER token-bbbbbbbbbbbbbbbb", True),
    ("Basic token-aaaaaaaaaaaaaaaa", False),
    ("Bearer token-aaaaaaaaaaaaaaa", False),
    ("Bearer ", False),
    ("", False),
    (None, False),
])
def test_bearer(header: str | None, ok: bool) -> None:
    tokens = (Secret("token-aaaaaaaaaaaaaaaa"), Secret("token-bbbbbbbbbbbbbbbb"))
    assert bearer_ok(header, tokens) is ok


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    for attempt in range(1, 40):
        delay = backoff_seconds(attempt, base=2, cap=300, rng=rng)
        assert 1 <= delay <= min(300, 2 * 2 ** (attempt - 1))
    delays = {round(backoff_seconds(6, base=2, cap=300, rng=rng), 3) for _ in range(20)}
    assert len(delays) > 10
    with pytest.raises(ValueError):
        backoff_seconds(0, base=2, cap=300)
