"""The Enqueuer (shared/queue.py) against a real redis-server broker."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu import Producer

from kling_relay.shared.queue import COPY_QUEUE, SUBMIT_QUEUE, Enqueuer, make_celery
from tests.support.relay_runtime import queued_job_ids


@pytest.fixture()
def app(redis_url: str) -> Iterator[Celery]:
    app = make_celery(redis_url)
    yield app
    app.close()


def sent_events(pubsub: redis.client.PubSub) -> int:
    """How many task-sent events were published since the last call (what Flower shows for a task sent)."""
    count = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is None and count:
            break
        if message is not None and message["type"] == "pmessage" and "task.sent" in message["channel"]:
            count += 1
    return count


def test_a_batch_sends_its_messages_and_their_events_together_when_the_block_ends(
        app: Celery, redis_client: redis.Redis) -> None:
    """Issue 11: the reconciler re-sends its due jobs' messages in one batch (`Enqueuer.batch`): nothing reaches
    the broker before the block ends, then every message and its task-sent event does; a block left with an
    exception sends nothing of its own."""
    pubsub = redis_client.pubsub()
    pubsub.psubscribe("*celeryev*")
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    enqueuer = Enqueuer(app)
    with enqueuer.batch() as batch:
        batch.submit("job_a")
        batch.copy("job_b")
        batch.submit("job_c")
        assert redis_client.llen(SUBMIT_QUEUE) == 0 and redis_client.llen(COPY_QUEUE) == 0, "nothing sent yet"
    assert queued_job_ids(redis_client, SUBMIT_QUEUE) == ["job_a", "job_c"]
    assert queued_job_ids(redis_client, COPY_QUEUE) == ["job_b"]
    assert sent_events(pubsub) == 3

    with pytest.raises(RuntimeError), enqueuer.batch() as batch:
        batch.submit("job_d")
        raise RuntimeError("stopped before the end")
    enqueuer.submit("job_e")  # the plain enqueuer sends at once, as ever
    assert queued_job_ids(redis_client, SUBMIT_QUEUE) == ["job_a", "job_c", "job_e"]
    pubsub.close()


def test_without_kombus_batch_a_batch_sends_each_message_at_once(app: Celery, redis_client: redis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A kombu before `Producer.batch` (the project allows Celery 5.4 up): the same calls work, on one producer,
    each message sent when it is made."""
    monkeypatch.delattr(Producer, "batch")
    with Enqueuer(app).batch() as batch:
        batch.submit("job_a")
        assert queued_job_ids(redis_client, SUBMIT_QUEUE) == ["job_a"]
        batch.copy("job_b")
    assert queued_job_ids(redis_client, SUBMIT_QUEUE) == ["job_a"] and queued_job_ids(redis_client, COPY_QUEUE) == [
        "job_b"]


def test_a_batch_sized_for_its_messages_sends_them_all_at_the_end(app: Celery, redis_client: redis.Redis) -> None:
    """kombu sends a batch by itself whenever 1,000 Redis commands wait (500 messages with their events); a batch told
    how many it will send holds them all until the block ends, so a failure there leaves none of them sent."""
    with Enqueuer(app).batch(600) as batch:
        for i in range(600):
            batch.submit(f"job_{i}")
        assert redis_client.llen(SUBMIT_QUEUE) == 0, "nothing sent yet"
    assert redis_client.llen(SUBMIT_QUEUE) == 600
