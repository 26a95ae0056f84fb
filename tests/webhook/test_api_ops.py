"""`POST /v1/jobs/<id>/retry|cancel` and the input checks of the API, through the Flask app on a real redis-server."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.queue import COPY_QUEUE, SUBMIT_QUEUE
from kling_relay.shared.runtime import Runtime
from tests.shared.test_ops import REQUEST, failed_job, messages
from tests.webhook.conftest import TOKENS, auth


@pytest.fixture()
def store(runtime: Runtime) -> JobStore:
    return runtime.store


def queued_job(store: JobStore, state: JobState = JobState.QUEUED) -> str:
    job, _ = store.create(dict(REQUEST))
    if state is not JobState.QUEUED:
        store.step(job.id, state, source="worker", set_fields={"kling_task_id": "task-1"})
    return job.id


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                     {"Authorization": TOKENS[0]}], ids=["none", "wrong", "no-scheme"])
def test_actions_need_a_valid_token(client: FlaskClient, store: JobStore, action: str,
                                    headers: dict[str, str]) -> None:
    job_id = queued_job(store)
    response = client.post(f"/v1/jobs/{job_id}/{action}", headers=headers)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert store.require(job_id).state is JobState.QUEUED


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize("job_id", ["job_nope", "x" * 65, "job_1:events"])
def test_unknown_or_malformed_ids_are_404(client: FlaskClient, action: str, job_id: str) -> None:
    response = client.post(f"/v1/jobs/{job_id}/{action}", headers=auth())
    assert response.status_code == 404 and response.json == {"error": "no such job"}


def test_get_never_reads_a_key_that_is_not_a_job(client: FlaskClient, store: JobStore) -> None:
    job_id = queued_job(store)
    for suffix in (":events", ":request"):  # other keys of the store, of other Redis types
        assert client.get(f"/v1/jobs/{job_id}{suffix}", headers=auth()).status_code == 404


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.SUBMITTED, JobState.PROCESSING, JobState.GENERATED])
def test_cancel_answers_the_canceled_job_and_records_who_and_why(client: FlaskClient, store: JobStore,
                                                                  state: JobState) -> None:
    job_id = queued_job(store, state)
    response = client.post(f"/v1/jobs/{job_id}/cancel", json={"reason": "customer left"}, headers=auth(TOKENS[1]))
    assert response.status_code == 200, response.json
    body: dict[str, Any] = response.json or {}
    assert body["id"] == job_id and body["state"] == "canceled"
    event = body["events"][-1]
    assert (event["from"], event["to"], event["source"]) == (state.value, "canceled", "api")
    assert event["detail"]["via"] == "http:app2"  # the token's name (issue 13), never the token
    assert event["detail"]["reason"] == "customer left"
    assert TOKENS[1] not in response.text


def test_cancel_twice_is_409_with_the_state(client: FlaskClient, store: JobStore) -> None:
    job_id = queued_job(store)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth()).status_code == 200
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth())
    assert again.status_code == 409
    assert again.json is not None and again.json["state"] == "canceled" and "already canceled" in again.json["error"]


def test_retry_of_a_copy_failure_answers_the_generated_job_and_queues_the_copy(
        client: FlaskClient, store: JobStore, redis_client: redis.Redis) -> None:
    job_id = failed_job(store, "copy_exhausted", task_id="task-3", via=[JobState.GENERATED])
    response = client.post(f"/v1/jobs/{job_id}/retry", headers=auth())
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["state"] == "generated" and response.json["error"] is None
    assert messages(redis_client, COPY_QUEUE) == [[job_id]]


def test_retry_after_kling_failed_is_409_and_changes_nothing(client: FlaskClient, store: JobStore,
                                                             redis_client: redis.Redis) -> None:
    job_id = failed_job(store, "kling_failed", task_id="task-4")
    events = store.events(job_id)
    response = client.post(f"/v1/jobs/{job_id}/retry", headers=auth())
    assert response.status_code == 409
    assert response.json is not None and response.json["state"] == "failed"
    assert "new job" in response.json["error"]
    assert store.events(job_id) == events and messages(redis_client, SUBMIT_QUEUE) == []


def test_retry_of_a_live_job_is_409(client: FlaskClient, store: JobStore) -> None:
    job_id = queued_job(store, JobState.PROCESSING)
    response = client.post(f"/v1/jobs/{job_id}/retry", headers=auth())
    assert response.status_code == 409 and response.json is not None and response.json["state"] == "processing"


@pytest.mark.parametrize(("kwargs", "status", "fields"), [
    ({"data": b"{nope", "content_type": "application/json"}, 400, None),
    ({"data": b'{"reason": NaN}', "content_type": "application/json"}, 400, None),
    ({"data": b"reason=x", "content_type": "application/x-www-form-urlencoded"}, 400, None),
    ({"json": ["why"]}, 422, ["body"]),
    ({"json": {"reason": 5}}, 422, ["reason"]),
    ({"json": {"reason": "r" * 501}}, 422, ["reason"]),
    ({"json": {"why": "x", "reason": "ok"}}, 422, ["why"]),
    ({"data": b'{"reason": "' + b"x" * 17000 + b'"}', "content_type": "application/json"}, 413, None),
], ids=["not-json", "nan", "form", "array", "reason-type", "reason-long", "unknown-field", "too-large"])
def test_bad_action_bodies_are_refused_and_change_nothing(client: FlaskClient, store: JobStore,
                                                          kwargs: dict[str, Any], status: int,
                                                          fields: list[str] | None) -> None:
    job_id = queued_job(store)
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(), **kwargs)
    assert response.status_code == status, response.json
    assert response.json is not None and response.json["error"]
    if fields is not None:
        assert [f["field"] for f in response.json["fields"]] == fields
    assert store.require(job_id).state is JobState.QUEUED


def test_an_empty_body_with_any_content_type_is_fine(client: FlaskClient, store: JobStore) -> None:
    job_id = queued_job(store)
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(), data=b"", content_type="text/plain")
    assert response.status_code == 200


@pytest.mark.parametrize("limit", ["²", "٣", "0" * 5000 + "1", "201", "-1"])
def test_odd_list_limits_are_422(client: FlaskClient, limit: str) -> None:
    response = client.get("/v1/jobs", query_string={"limit": limit}, headers=auth())
    assert response.status_code == 422 and response.json is not None
    assert [f["field"] for f in response.json["fields"]] == ["limit"]


@pytest.mark.parametrize("body", [b'{"prompt": NaN}', b'{"metadata": {"a": Infinity}}',
                                  b"[" * 100_000 + b"]" * 100_000], ids=["nan", "infinity", "deep"])
def test_post_jobs_refuses_json_it_could_not_answer_with(client: FlaskClient, store: JobStore, body: bytes) -> None:
    response = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth())
    assert response.status_code == 400 and response.json is not None
    assert "not valid JSON" in response.json["error"]
    assert store.list()[0] == []


def _cursor(score: object, job_id: object) -> str:
    return base64.urlsafe_b64encode(json.dumps([score, job_id]).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [_cursor(float("nan"), "job_x"), _cursor(float("inf"), "job_x"),
                                    _cursor(1e308, 5), "!!", _cursor("a", "b")],
                         ids=["nan", "inf", "int-id", "garbage", "string-score"])
def test_forged_cursors_are_422(client: FlaskClient, store: JobStore, cursor: str) -> None:
    queued_job(store)
    response = client.get("/v1/jobs", query_string={"cursor": cursor}, headers=auth())
    assert response.status_code == 422, response.json
