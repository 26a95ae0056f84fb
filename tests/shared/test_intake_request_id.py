"""The request id of `POST /v1/jobs` follows the job (issue 10.6): into its first event and, as a message header,
into its submit, so the worker's lines for the submit carry it."""

from __future__ import annotations

import json

import redis

from kling_relay.shared.intake import accept_job
from kling_relay.shared.jobs import JobStore
from kling_relay.shared.queue import REQUEST_ID_HEADER, SUBMIT_QUEUE, Enqueuer
from kling_relay.shared.settings import load_client_settings
from tests.shared.test_ops import REQUEST, enqueuer, store  # noqa: F401 - fixtures


def test_the_request_id_is_in_the_first_event_and_the_submit_message(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis) -> None:  # noqa: F811
    settings = load_client_settings({})
    accepted = accept_job(dict(REQUEST), store=store, enqueuer=enqueuer, settings=settings, request_id="req-7")
    first = store.events(accepted.job.id)[0]
    assert first.to_state == "queued" and first.detail == {"request_id": "req-7"}
    (raw,) = redis_client.lrange(SUBMIT_QUEUE, 0, -1)
    assert json.loads(raw)["headers"][REQUEST_ID_HEADER] == "req-7"


def test_without_a_request_id_nothing_is_added(store: JobStore, enqueuer: Enqueuer,  # noqa: F811
                                               redis_client: redis.Redis) -> None:
    accepted = accept_job(dict(REQUEST), store=store, enqueuer=enqueuer, settings=load_client_settings({}))
    assert store.events(accepted.job.id)[0].detail == {}
    (raw,) = redis_client.lrange(SUBMIT_QUEUE, 0, -1)
    assert REQUEST_ID_HEADER not in json.loads(raw)["headers"]
