"""Text that could not be stored and forged cursors, through the Flask app on a real redis-server: each is a 422
naming the field, and nothing is stored or changed (never a 500)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.queue import SUBMIT_QUEUE
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.validation import text_problems
from tests.shared.test_ops import REQUEST, failed_job, messages
from tests.webhook.conftest import auth

LONE = "\ud800"
BODY: dict[str, Any] = {"image_list": [{"image": "https://example.com/a.png"}], "prompt": "a cat"}


@pytest.fixture()
def store(runtime: Runtime) -> JobStore:
    return runtime.store


def raw_json(value: object) -> bytes:
    """JSON as a client sends it: a lone surrogate goes out as the ASCII escape `\\ud800` (ensure_ascii)."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


@pytest.mark.parametrize(("body", "field"), [
    ({**BODY, "prompt": "a cat " + LONE}, "prompt"),
    ({**BODY, "negative_prompt": "dogs " + LONE}, "negative_prompt"),
    ({**BODY, "metadata": {LONE: "x"}}, 'metadata["\\ud800"]'),
    ({**BODY, "metadata": {"order": LONE}}, "metadata.order"),
    ({**BODY, "metadata": {"order": {"lines": [1, "\udfff"]}}}, "metadata.order.lines[1]"),
    ({**BODY, "image_list": [{"image": "https://example.com/" + LONE}]}, "image_list[0].image"),
    ({**BODY, "notify_url": "https://example.com/" + LONE}, "notify_url"),
    ({**BODY, LONE: "x"}, '["\\ud800"]'),
], ids=["prompt", "negative_prompt", "metadata-key", "metadata-value", "metadata-nested", "image", "notify_url",
        "unknown-field"])
def test_post_jobs_with_a_lone_surrogate_is_422_naming_the_field_and_stores_nothing(
        client: FlaskClient, redis_client: redis.Redis, store: JobStore, body: dict[str, Any], field: str) -> None:
    """Issue: a lone UTF-16 surrogate in a JSON string of a job was a 500 (UnicodeEncodeError writing to Redis)."""
    response = client.post("/v1/jobs", data=raw_json(body), content_type="application/json",
                           headers={**auth(), "Idempotency-Key": "same-key"})
    assert response.status_code == 422, response.text
    assert response.json is not None and field in [f["field"] for f in response.json["fields"]]
    assert not text_problems(response.json)  # the answer names the field with the surrogate escaped, as text
    assert store.counts() == dict.fromkeys(store.counts(), 0)
    assert redis_client.keys("kr:*") == [] and messages(redis_client, SUBMIT_QUEUE) == []


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize("reason", [LONE, "a \udcff b", "bell\x07", "x" * 501], ids=["lone", "surrogateescape",
                                                                                    "control", "501"])
def test_an_action_reason_that_is_not_storable_text_is_422_and_changes_nothing(
        client: FlaskClient, redis_client: redis.Redis, store: JobStore, action: str, reason: str) -> None:
    """Issue: a lone surrogate in a retry or cancel `reason` was a 500."""
    job_id = failed_job(store, "submit_exhausted") if action == "retry" else store.create(dict(REQUEST))[0].id
    before = (store.require(job_id), store.events(job_id))
    response = client.post(f"/v1/jobs/{job_id}/{action}", data=raw_json({"reason": reason}),
                           content_type="application/json", headers=auth())
    assert response.status_code == 422, response.text
    assert response.json is not None and [f["field"] for f in response.json["fields"]] == ["reason"]
    assert (store.require(job_id), store.events(job_id)) == before
    assert messages(redis_client, SUBMIT_QUEUE) == []


def test_an_unknown_action_field_that_is_not_text_is_named_escaped(client: FlaskClient, store: JobStore) -> None:
    job, _ = store.create(dict(REQUEST))
    response = client.post(f"/v1/jobs/{job.id}/cancel", data=raw_json({LONE: 1}), content_type="application/json",
                           headers=auth())
    assert response.status_code == 422 and response.json is not None
    assert [f["field"] for f in response.json["fields"]] == ["\\ud800"]
    assert store.require(job.id).state is JobState.QUEUED


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _cursor('[' + "9" * 400 + ', "job_x"]'), _cursor('[NaN, "job_x"]'), _cursor('[Infinity, "job_x"]'),
    _cursor('[-Infinity, "job_x"]'), _cursor('[1e400, "job_x"]'), _cursor('[1.0, "job_x:events"]'),
    _cursor('[1.0, 5]'), _cursor('{"a": 1}'), "!!", _cursor('["a", "b"]'),
], ids=["huge-int", "nan", "infinity", "minus-infinity", "overflow", "not-a-job-id", "int-id", "object",
        "not-base64", "string-score"])
def test_every_forged_cursor_is_422(client: FlaskClient, store: JobStore, cursor: str) -> None:
    """Issue: a huge integer was a 500 (OverflowError), an infinite score was answered with a page."""
    store.create(dict(REQUEST))
    response = client.get("/v1/jobs", query_string={"cursor": cursor}, headers=auth())
    assert response.status_code == 422, response.text
    assert response.json is not None and [f["field"] for f in response.json["fields"]] == ["cursor"]
