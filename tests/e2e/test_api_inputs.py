"""Every bad input to the HTTP API: the documented status, the field and reason, and nothing stored or sent."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit

pytestmark = pytest.mark.e2e


def _job_count(stack: LocalStack) -> int:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    return int(client.zcard("kr:jobs:all"))


def _queued_messages(stack: LocalStack) -> int:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    return int(client.llen("submit"))


CASES: list[tuple[str, dict[str, Any], int, list[str]]] = [
    ("no token", {"headers": {"Authorization": ""}, "json": {}}, 401, []),
    ("wrong token", {"token": "not-a-valid-token-at-all", "json": {}}, 401, []),
    ("not json", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, []),
    ("form encoded", {"data": {"prompt": "x"}}, 400, []),
    ("too large", {"data": b'{"prompt": "' + b"x" * 2_100_000 + b'"}',
                   "headers": {"Content-Type": "application/json"}}, 413, []),
    ("json array", {"json": [1, 2]}, 422, ["body"]),
    ("missing prompt and images", {"json": {}}, 422, ["image_list", "prompt"]),
    ("five images", {"json": job_body(0, image_list=[{"image": "https://example.com/a.png"}] * 5)}, 422,
     ["image_list"]),
    ("data prefix", {"json": job_body(0, image_list=[{"image": "data:image/png;base64,AAAA"}])}, 422,
     ["image_list[0].image"]),
    ("bad duration and mode", {"json": job_body(0, duration=7, mode="ultra")}, 422, ["mode", "duration"]),
    ("image_tail", {"json": job_body(0, image_tail="https://example.com/x.png")}, 422, ["image_tail"]),
    ("callback_url from user", {"json": job_body(0, callback_url="https://evil.example.com")}, 422,
     ["callback_url"]),
    ("bad notify_url", {"json": job_body(0, notify_url="ftp://x")}, 422, ["notify_url"]),
    ("notify_url to cloud metadata", {"json": job_body(0, notify_url="http://169.254.169.254/latest/")}, 422,
     ["notify_url"]),
    ("metadata not an object", {"json": job_body(0, metadata=[1])}, 422, ["metadata"]),
    ("prompt too long", {"json": job_body(0, prompt="p" * 2501)}, 422, ["prompt"]),
    ("idempotency key too long", {"json": job_body(0), "headers": {"Idempotency-Key": "k" * 300}}, 422,
     ["Idempotency-Key"]),
]


@pytest.mark.parametrize(("name", "request_kwargs", "status", "fields"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(clean_sim: LocalStack, name: str, request_kwargs: dict[str, Any],
                                                  status: int, fields: list[str]) -> None:
    stack = clean_sim
    jobs_before, queued_before = _job_count(stack), _queued_messages(stack)
    kwargs = dict(request_kwargs)
    token = kwargs.pop("token", None)
    response = stack.api("POST", "/v1/jobs", **({"token": token} if token else {}), **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]
    if status == 422:
        assert [f["field"] for f in body["fields"]] == fields
        assert all(f["problem"] for f in body["fields"])
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert _job_count(stack) == jobs_before
    assert _queued_messages(stack) == queued_before
    assert stack.sim_stats()["tasks_created"] == 0


def test_idempotency_key_replays_and_conflicts(clean_sim: LocalStack) -> None:
    stack = clean_sim
    headers = {"Idempotency-Key": "order-1"}
    first = stack.api("POST", "/v1/jobs", json=job_body(1), headers=headers)
    again = stack.api("POST", "/v1/jobs", json=job_body(1), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    jobs = _job_count(stack)
    conflict = stack.api("POST", "/v1/jobs", json=job_body(2), headers=headers)
    assert conflict.status_code == 409 and "Idempotency-Key" in conflict.json()["error"]
    assert _job_count(stack) == jobs


def test_get_and_list(clean_sim: LocalStack) -> None:
    stack = clean_sim
    job_id = submit(stack, job_body(3))
    got = stack.api("GET", f"/v1/jobs/{job_id}")
    assert got.status_code == 200
    job = got.json()
    assert set(job) >= {"id", "state", "kling_task_id", "created_at", "updated_at", "error", "videos", "events"}
    assert "base64" not in got.text and job_body(3)["image_list"][0]["image"][:40] not in got.text
    assert stack.api("GET", "/v1/jobs/job_nope").status_code == 404
    assert stack.api("GET", f"/v1/jobs/{job_id}", token="wrong-token-wrong-token").status_code == 401
    listed = stack.api("GET", "/v1/jobs", params={"limit": 1}).json()
    assert len(listed["jobs"]) == 1 and listed["jobs"][0]["id"] == job_id and listed["next_cursor"]
    nxt = stack.api("GET", "/v1/jobs", params={"limit": 1, "cursor": listed["next_cursor"]}).json()
    assert nxt["jobs"] and nxt["jobs"][0]["id"] != job_id
    for params, field in [({"state": "nope"}, "state"), ({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"),
                          ({"cursor": "garbage!"}, "cursor")]:
        bad = stack.api("GET", "/v1/jobs", params=params)
        assert bad.status_code == 422, (params, bad.text)
        assert [f["field"] for f in bad.json()["fields"]] == [field]


def test_a_chunked_body_over_the_limit_is_413_not_cut(clean_sim: LocalStack) -> None:
    """Without Content-Length (chunked), a body over MAX_REQUEST_BYTES (2,000,000 here) is refused whole."""
    stack = clean_sim
    jobs_before = _job_count(stack)
    body = b'{"prompt": "' + b"x" * 2_100_000 + b'"}'

    def chunks() -> Any:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    response = stack.api("POST", "/v1/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    exact = b'{"prompt": "' + b"x" * (2_000_000 - 14) + b'"}'
    assert len(exact) == 2_000_000
    response = stack.api("POST", "/v1/jobs", data=iter([exact]), headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text  # read whole: only the missing images are wrong
    assert _job_count(stack) == jobs_before
