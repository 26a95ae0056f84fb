"""Issue 13: several backend apps on one relay. Named tokens with roles; each app sees only its own jobs; operators
see all; per-app idempotency keys and cap. Through the Flask app on a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from kling_relay.shared.jobs import JobState
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import load_settings
from kling_relay.webhook.app import create_app
from tests.webhook.conftest import app_env, auth, open_runtime
from tests.webhook.test_api_inputs import BODY

WEB = "web-app-token-0123456789"
BATCH = "batch-app-token-0123456789"
ONCALL = "oncall-ops-token-0123456789"


def _runtime(redis_url: str, **extra: str) -> Iterator[Runtime]:
    settings = load_settings({**app_env(redis_url, **extra), "API_TOKENS": f"web:{WEB},batch:{BATCH}"})
    with open_runtime(settings) as rt:
        yield rt


@pytest.fixture()
def rt(redis_url: str) -> Iterator[Runtime]:
    yield from _runtime(redis_url, OPS_TOKENS=f"oncall:{ONCALL}", EVENTS_STREAM="kr-test-events")


@pytest.fixture()
def http(rt: Runtime) -> FlaskClient:
    return create_app(runtime=rt).test_client()


def _submit(http: FlaskClient, token: str, key: str | None = None) -> dict[str, Any]:
    headers = {**auth(token), **({"Idempotency-Key": key} if key else {})}
    response = http.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 202, response.json
    body: dict[str, Any] = response.json or {}
    return body


def _snapshot(rt: Runtime, job_id: str) -> tuple[dict[str, str], list[str]]:
    return rt.redis.hgetall(f"kr:job:{job_id}"), rt.redis.lrange(f"kr:job:{job_id}:events", 0, -1)  # type: ignore


def test_cross_app_reads_lists_retries_and_cancels_are_404_and_change_nothing(http: FlaskClient,
                                                                               rt: Runtime) -> None:
    """Acceptance: two app tokens and one ops token; every cross-app access is 404 (as for an unknown id)."""
    mine = _submit(http, WEB)
    theirs = _submit(http, BATCH)
    assert mine["app"] == "web" and theirs["app"] == "batch"
    failed = _submit(http, BATCH)
    rt.store.step(failed["id"], JobState.FAILED, source="worker",
                  set_fields={"error": {"reason": "submit_exhausted", "message": "no"}})
    for job in (theirs, failed):
        before = _snapshot(rt, job["id"])
        for method, path in (("get", ""), ("post", "/retry"), ("post", "/cancel")):
            response = getattr(http, method)(f"/v1/jobs/{job['id']}{path}", headers=auth(WEB))
            assert response.status_code == 404 and response.json == {"error": "no such job"}, (path, response.json)
        assert _snapshot(rt, job["id"]) == before
    listed = http.get("/v1/jobs", headers=auth(WEB)).json or {}
    assert [j["id"] for j in listed["jobs"]] == [mine["id"]]
    assert http.get("/v1/jobs?app=batch", headers=auth(WEB)).status_code == 422
    # the owner acts on its own jobs
    assert http.post(f"/v1/jobs/{failed['id']}/retry", headers=auth(BATCH)).status_code == 200
    assert http.post(f"/v1/jobs/{theirs['id']}/cancel", headers=auth(BATCH)).status_code == 200
    assert {j["id"] for j in (http.get("/v1/jobs", headers=auth(BATCH)).json or {})["jobs"]} == \
        {theirs["id"], failed["id"]}


def test_ops_sees_and_acts_on_every_app(http: FlaskClient, rt: Runtime) -> None:
    a, b = _submit(http, WEB), _submit(http, BATCH)
    listed = http.get("/v1/jobs", headers=auth(ONCALL)).json or {}
    assert {j["id"] for j in listed["jobs"]} == {a["id"], b["id"]}
    only_web = http.get("/v1/jobs?app=web", headers=auth(ONCALL)).json or {}
    assert [j["id"] for j in only_web["jobs"]] == [a["id"]]
    assert http.get(f"/v1/jobs/{b['id']}", headers=auth(ONCALL)).status_code == 200
    response = http.post(f"/v1/jobs/{b['id']}/cancel", headers=auth(ONCALL))
    assert response.status_code == 200
    assert (response.json or {})["events"][-1]["detail"]["via"] == "http:oncall"
    assert ONCALL not in response.text
    # the events stream names the app, so a consumer can filter
    entries = rt.redis.xrange("kr-test-events")
    assert [(f["job_id"], f["app"]) for _, f in entries] == [(b["id"], "batch")]  # type: ignore[index]
    assert json.loads(entries[0][1]["payload"])["data"]["app"] == "batch"  # type: ignore[index]
    for path, method in (("/v1/status", "get"), ("/v1/submission/resume", "post"), ("/v1/copy/resume", "post")):
        assert getattr(http, method)(path, headers=auth(ONCALL)).status_code == 200


@pytest.mark.parametrize("token", [WEB, BATCH])
@pytest.mark.parametrize(("method", "path"), [("get", "/v1/status"), ("post", "/v1/submission/resume"),
                                              ("post", "/v1/copy/resume")])
def test_app_tokens_get_403_on_ops_routes(http: FlaskClient, rt: Runtime, token: str, method: str,
                                          path: str) -> None:
    rt.redis.hset("kr:flow:pause", mapping={"reason": "auth", "since": "1"})
    response = getattr(http, method)(path, headers=auth(token))
    assert response.status_code == 403
    assert rt.redis.exists("kr:flow:pause")  # nothing resumed


def test_the_same_idempotency_key_from_two_apps_makes_two_jobs(http: FlaskClient) -> None:
    a, b = _submit(http, WEB, key="order-42"), _submit(http, BATCH, key="order-42")
    assert a["id"] != b["id"]
    again = http.post("/v1/jobs", json=BODY, headers={**auth(WEB), "Idempotency-Key": "order-42"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (again.json or {})["id"] == a["id"]


def test_without_ops_tokens_every_api_token_is_an_operator(redis_url: str) -> None:
    """Backwards compatible: OPS_TOKENS unset, API tokens keep the ops routes and see every job."""
    for rt in _runtime(redis_url):
        http = create_app(runtime=rt).test_client()
        theirs = _submit(http, BATCH)
        assert http.get("/v1/status", headers=auth(WEB)).status_code == 200
        assert http.get(f"/v1/jobs/{theirs['id']}", headers=auth(WEB)).status_code == 200


def test_an_app_over_its_active_cap_gets_429_with_retry_after(redis_url: str) -> None:
    for rt in _runtime(redis_url, OPS_TOKENS=f"oncall:{ONCALL}", APP_MAX_ACTIVE_JOBS="2"):
        http = create_app(runtime=rt).test_client()
        first, _ = _submit(http, WEB, key="k1"), _submit(http, WEB)
        refused = http.post("/v1/jobs", json=BODY, headers=auth(WEB))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert len((http.get("/v1/jobs", headers=auth(WEB)).json or {})["jobs"]) == 2  # nothing stored
        replay = http.post("/v1/jobs", json=BODY, headers={**auth(WEB), "Idempotency-Key": "k1"})
        assert replay.status_code == 202 and (replay.json or {})["id"] == first["id"]  # a replay is not a new job
        assert _submit(http, BATCH)["app"] == "batch"  # another app is not held back
        rt.store.step(first["id"], JobState.CANCELED, source="api")
        assert _submit(http, WEB)["app"] == "web"  # a finished job frees a place
