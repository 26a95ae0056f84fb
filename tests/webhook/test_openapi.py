"""`GET /openapi.json`: a valid OpenAPI 3.1 document that covers every route and matches what the views return."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.validation import FieldProblem, problems_payload
from tests.shared.test_ops import REQUEST, failed_job
from tests.webhook.conftest import auth


@pytest.fixture()
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")  # no token
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert isinstance(response.json, dict)
    return response.json


def conforms(document: dict[str, Any], schema_name: str, instance: object) -> list[str]:
    """Messages of every way `instance` breaks the named component schema (empty when it conforms)."""
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return [e.message for e in Draft202012Validator(root).iter_errors(instance)]


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def _api_rule(rule: Any) -> bool:
    """Routes of the HTTP API; the operators' dashboard (HTML pages for people, `dashboard.*`) is not part of it."""
    return rule.endpoint != "static" and not rule.endpoint.startswith("dashboard.")


def test_every_route_of_the_app_is_described(app: Flask, document: dict[str, Any]) -> None:
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    for rule in app.url_map.iter_rules():
        if not _api_rule(rule):
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in described, (path, method)
    assert len(described) == sum(len(r.methods - {"HEAD", "OPTIONS"}) for r in app.url_map.iter_rules()
                                 if _api_rule(r))


def test_jobs_in_every_state_match_the_job_schemas(runtime: Runtime, document: dict[str, Any]) -> None:
    store: JobStore = runtime.store
    job, _ = store.create(dict(REQUEST), notify_url="https://example.com/hook", metadata={"order": 1})
    stored, _ = store.create(dict(REQUEST))
    store.step(stored.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "t"})
    store.note(stored.id, source="callback", detail={"duplicate": True})
    video = {"bucket": "b", "key": "k/video.mp4", "sha256": "ab" * 32, "bytes": 10, "duration": "5.0"}
    store.step(stored.id, JobState.STORED, source="worker", set_fields={"videos": [video]})
    failed = failed_job(store, "kling_failed", task_id="t2")
    for job_id in (job.id, stored.id, failed):
        current = store.require(job_id)
        assert conforms(document, "JobWithEvents", current.public_dict(store.events(job_id))) == []
        assert conforms(document, "Job", current.public_dict()) == []
        assert conforms(document, "JobWithEvents", current.public_dict()) != []  # events are required there


def test_responses_match_their_declared_schemas(client: FlaskClient, runtime: Runtime,
                                               document: dict[str, Any]) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    checks = [
        (client.get("/healthz"), "/healthz", "get"),
        (client.get("/readyz"), "/readyz", "get"),
        (client.get("/livez"), "/livez", "get"),
        (client.get("/v1/jobs", headers=auth()), "/v1/jobs", "get"),
        (client.get("/v1/jobs", query_string={"limit": "x"}, headers=auth()), "/v1/jobs", "get"),
        (client.post("/v1/jobs", json={}, headers=auth()), "/v1/jobs", "post"),
        (client.post("/v1/jobs", json=REQUEST), "/v1/jobs", "post"),
        (client.get(f"/v1/jobs/{job.id}", headers=auth()), "/v1/jobs/{job_id}", "get"),
        (client.post(f"/v1/jobs/{job.id}/retry", headers=auth()), "/v1/jobs/{job_id}/retry", "post"),
        (client.post(f"/v1/jobs/{job.id}/cancel", headers=auth()), "/v1/jobs/{job_id}/cancel", "post"),
        (client.post(f"/callbacks/kling/{job.id}", json={}), "/callbacks/kling/{job_id}", "post"),
    ]
    seen = set()
    for response, path, method in checks:
        declared = document["paths"][path][method]["responses"]
        status = str(response.status_code)
        assert status in declared, (path, method, status)
        schema = declared[status]["content"]["application/json"]["schema"]
        root = {**schema, "components": document["components"]}
        assert list(Draft202012Validator(root).iter_errors(response.json)) == [], (path, status, response.json)
        seen.add(status)
    assert {"200", "401", "409", "422", "403"} <= seen


def test_the_422_schema_is_the_validation_payload(document: dict[str, Any]) -> None:
    payload = problems_payload([FieldProblem("prompt", "is required"), FieldProblem("image_list", "is empty")])
    assert conforms(document, "ValidationError", payload) == []
    assert conforms(document, "ValidationError", {"error": "invalid request", "fields": []}) != []


def test_limits_come_from_the_settings(redis_url: str) -> None:
    from kling_relay.webhook.openapi import openapi_document
    from tests.webhook.conftest import app_settings

    document = openapi_document(app_settings(redis_url, PROMPT_MAX_CHARS="5000"))
    assert document["components"]["schemas"]["JobRequest"]["properties"]["prompt"]["maxLength"] == 5000


def test_the_outgoing_notification_is_described_under_webhooks(runtime: Runtime, document: dict[str, Any]) -> None:
    """Issue 8.8: the signed POST to a job's notify_url is part of the contract: `webhooks.jobEvent`, with the
    Standard Webhooks headers, and a body schema the payloads the relay sends (and streams) conform to."""
    validate(document)  # `webhooks` included: OpenAPI 3.1 checks its Path Items like the paths'
    post = document["webhooks"]["jobEvent"]["post"]
    headers = {p["name"] for p in post["parameters"] if p["in"] == "header" and p["required"]}
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobEvent"}
    from kling_relay.shared.notify import event_payload

    job, _ = runtime.store.create(dict(REQUEST), notify_url="https://example.com/hook",
                                  notify_events=["processing", "stored"])
    runtime.store.step(job.id, JobState.PROCESSING, source="callback")
    canceled = runtime.store.step(job.id, JobState.CANCELED, source="api").job
    assert conforms(document, "JobEvent", event_payload(canceled.public_dict())) == []
    assert conforms(document, "JobEvent", event_payload(canceled.public_dict(), state="processing",
                                                        at="2026-01-01T00:00:00.000Z")) == []
    assert conforms(document, "JobEvent", {**event_payload(canceled.public_dict()), "timestamp": 1.5}) != []
    assert conforms(document, "JobEvent", event_payload(canceled.public_dict(), state="queued")) != []


def test_notify_events_is_in_the_job_body_and_view(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    body = schemas["JobRequest"]["properties"]["notify_events"]
    assert body["items"]["enum"] == ["submitted", "processing", "generated", "stored", "failed", "canceled"]
    assert "notify_events" in schemas["Job"]["required"]
    assert conforms(document, "JobRequest", {**REQUEST, "notify_url": "https://a.example/h",
                                             "notify_events": ["processing", "stored"]}) == []
    assert conforms(document, "JobRequest", {**REQUEST, "notify_events": ["stored", "stored"]}) != []
