"""The Python client (shared/client.py) checks what the HTTP API checks, on a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from kling_relay.shared.client import Relay
from kling_relay.shared.jobs import InvalidCursor, JobNotFound, JobState, JobStore
from kling_relay.shared.queue import SUBMIT_QUEUE, Enqueuer, make_celery
from kling_relay.shared.validation import ValidationFailed
from tests.shared.test_ops import REQUEST, failed_job, messages
from tests.webhook.conftest import app_settings

IMAGES = [{"image": "https://example.com/a.png"}]


@pytest.fixture()
def relay(redis_url: str, redis_client: redis.Redis) -> Iterator[Relay]:
    app = make_celery(redis_url)
    yield Relay(app_settings(redis_url), store=JobStore(redis_client), enqueuer=Enqueuer(app))
    app.close()


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "a \ud800"}, "prompt"),
    ({"prompt": "ok", "negative_prompt": "\udfff"}, "negative_prompt"),
    ({"prompt": "ok", "metadata": {"\ud800": "x"}}, 'metadata["\\ud800"]'),
    ({"prompt": "ok", "metadata": {"order": ["\ud800"]}}, "metadata.order[0]"),
], ids=["prompt", "negative_prompt", "metadata-key", "metadata-value"])
def test_submit_with_a_lone_surrogate_raises_validation_failed_and_stores_nothing(
        relay: Relay, redis_client: redis.Redis, fields: dict[str, Any], field: str) -> None:
    """Issue: Relay.submit raised UnicodeEncodeError from the Redis write instead of ValidationFailed."""
    with pytest.raises(ValidationFailed) as refused:
        relay.submit(image_list=IMAGES, idempotency_key="k1", **fields)
    assert field in [p.field for p in refused.value.problems]
    assert redis_client.keys("*") == []


def test_the_ops_actions_check_their_input(relay: Relay, redis_client: redis.Redis) -> None:
    job_id = failed_job(relay.store, "submit_exhausted")
    with pytest.raises(ValidationFailed):
        relay.retry(job_id, reason="r" * 501)
    with pytest.raises(ValidationFailed):
        relay.cancel(job_id, reason="\udcff")
    with pytest.raises(JobNotFound):
        relay.retry(job_id + ":events")
    assert relay.get(job_id + ":events") is None
    assert relay.store.require(job_id).state is JobState.FAILED and messages(redis_client, SUBMIT_QUEUE) == []
    queued, _ = relay.store.create(dict(REQUEST))
    assert relay.cancel(queued.id, reason="done").state is JobState.CANCELED
    with pytest.raises(InvalidCursor):
        relay.list(cursor="WzFlNDAwLCAiam9iX3giXQ")  # [1e400, "job_x"]
