"""The in-process client (`Relay`) and its settings: REDIS_URL is all it needs, against a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from kling_relay.shared.client import Relay
from kling_relay.shared.jobs import JobState
from kling_relay.shared.queue import SUBMIT_QUEUE, SUBMIT_TASK
from kling_relay.shared.settings import Secret, SettingsError, load_client_settings
from kling_relay.shared.validation import ValidationFailed

IMAGE = [{"image": "https://example.com/a.jpg"}]


def test_relay_from_env_needs_only_redis_url(redis_url: str, redis_client: redis.Redis) -> None:
    """Issue 8 item 2: `Relay.from_env()` required the Kling keys, CALLBACK_SECRET, API_TOKENS and S3_BUCKET (so
    every app using it held the Kling secret key). With REDIS_URL alone it takes a job in, queues it, reads and
    cancels it."""
    with Relay.from_env({"REDIS_URL": redis_url}) as relay:
        job = relay.submit(image_list=IMAGE, prompt="a sunrise", idempotency_key="order-1", metadata={"order": 1})
        assert relay.submit(image_list=IMAGE, prompt="a sunrise", idempotency_key="order-1",
                            metadata={"order": 1}).id == job.id
        got = relay.get(job.id)
        assert got is not None and got.state is JobState.QUEUED and got.metadata == {"order": 1}
        [message] = redis_client.lrange(SUBMIT_QUEUE, 0, -1)
        assert json.loads(message)["headers"]["task"] == SUBMIT_TASK
        assert [j.id for j in relay.list(state="queued")[0]] == [job.id]
        assert relay.cancel(job.id, reason="test").state is JobState.CANCELED
        assert relay.status()["submission"] == "open"


def test_relay_without_notify_secret_refuses_notify_url_and_with_it_accepts(redis_url: str) -> None:
    with Relay.from_env({"REDIS_URL": redis_url}) as relay, pytest.raises(ValidationFailed) as info:
        relay.submit(image_list=IMAGE, prompt="p", notify_url="https://app.example.com/hook")
    assert [p.field for p in info.value.problems] == ["notify_url"]
    assert "NOTIFY_SECRET" in info.value.problems[0].problem
    env = {"REDIS_URL": redis_url, "NOTIFY_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
    with Relay.from_env(env) as relay:
        job = relay.submit(image_list=IMAGE, prompt="p", notify_url="https://app.example.com/hook")
        assert job.notify_url == "https://app.example.com/hook"


def test_client_settings_read_the_intake_limits_and_name_bad_values(tmp_path: Path) -> None:
    secret_file = tmp_path / "notify"
    secret_file.write_text("plain-notify-secret\n")
    s = load_client_settings({"REDIS_URL": "redis://:pw123456@cache:6379/1", "PROMPT_MAX_CHARS": "5000",
                              "JOB_DEADLINE_SECONDS": "60", "NOTIFY_SECRET_FILE": str(secret_file),
                              "KLING_SECRET_KEY": "never read"})
    assert s.prompt_max_chars == 5000 and s.job_deadline_seconds == 60.0
    assert s.notify_secret == Secret("plain-notify-secret")
    assert "pw123456" not in repr(s) and "pw123456" not in json.dumps(s.redacted())
    assert s.redacted()["notify_secret"] == "***"
    assert load_client_settings({}).redis_url == "redis://127.0.0.1:6379/0"
    with pytest.raises(SettingsError) as info:
        load_client_settings({"REDIS_URL": "http://x", "PROMPT_MAX_CHARS": "many", "NOTIFY_URL_ALLOWLIST": "ftp://x"})
    assert set(info.value.problems) == {"REDIS_URL", "PROMPT_MAX_CHARS", "NOTIFY_URL_ALLOWLIST"}
