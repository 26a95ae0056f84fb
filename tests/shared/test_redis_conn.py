"""REDIS_URL for a Sentinel deployment (issue 12 item 5): parsing, the setting's check, Celery's broker settings."""

from __future__ import annotations

import pytest

from kling_relay.shared.queue import make_celery
from kling_relay.shared.redis_conn import SentinelTarget, celery_broker, parse_sentinel
from kling_relay.shared.settings_spec import redis_url


def test_parse_sentinel_url() -> None:
    assert parse_sentinel("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/relay/2") == SentinelTarget(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "relay", 2, "s@cret")
    assert parse_sentinel("redis+sentinel://h:1/mymaster") == SentinelTarget((("h", 1),), "mymaster", 0, None)


@pytest.mark.parametrize("bad", ["redis+sentinel://h/relay", "redis+sentinel://h:1/", "redis+sentinel://h:1/a/b",
                                 "redis+sentinel://h:1,:2/relay", "redis+sentinel://h:99999/relay"])
def test_bad_sentinel_urls_are_refused_without_their_password(bad: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://"):
        redis_url(bad, "REDIS_URL")
    with pytest.raises(ValueError) as info:
        redis_url(bad.replace("://", "://:hunter2@"), "REDIS_URL")
    assert "hunter2" not in str(info.value)


def test_plain_urls_pass_unchanged() -> None:
    assert redis_url("redis://127.0.0.1:6379/0", "REDIS_URL") == "redis://127.0.0.1:6379/0"
    assert celery_broker("redis://127.0.0.1:6379/0") == (
        "redis://127.0.0.1:6379/0", {"broker_transport": "kling_relay.shared.broker_transport:FailoverTransport"})
    assert celery_broker("rediss://h:6380/0") == ("rediss://h:6380/0", {})


def test_celery_gets_kombus_sentinel_transport() -> None:
    app = make_celery("redis+sentinel://:p%3Aw@a:1,b:2/relay/3")
    assert app.conf.broker_url == "sentinel://:p%3Aw@a:1/3;sentinel://:p%3Aw@b:2/3"
    assert app.conf.broker_transport == "kling_relay.shared.broker_transport:FailoverSentinelTransport"
    options = app.conf.broker_transport_options
    assert options["master_name"] == "relay" and options["visibility_timeout"] > 0
    with app.connection_for_write() as conn:
        assert [type(conn.transport).__name__, conn.alt] == [
            "FailoverSentinelTransport", ["sentinel://:p%3Aw@a:1/3", "sentinel://:p%3Aw@b:2/3"]]
