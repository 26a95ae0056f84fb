"""The body real clients send, through the Flask app on a real redis-server (issue 9 item 5): the seed reseller's
example body is accepted as it is, `watermark_info` is kept for Kling, empty single-image fields are dropped, and the
models accepted follow KLING_MODELS (in the API and in its OpenAPI description)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from kling_relay.shared.queue import make_celery
from kling_relay.shared.runtime import Runtime
from kling_relay.webhook.app import create_app
from tests.webhook.conftest import app_settings, auth

IMAGE = "https://example.com/a.png"
SEED_BODY: dict[str, Any] = {
    "model_name": "kling-v1-6", "image_list": [{"image": IMAGE}, {"image": IMAGE}], "prompt": "a cat",
    "negative_prompt": "", "mode": "std", "duration": "5", "aspect_ratio": "16:9", "image_tail": "",
    "watermark_info": {"enabled": True},
}


def schema_errors(document: dict[str, Any], name: str, instance: object) -> list[str]:
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return [e.message for e in Draft202012Validator(root).iter_errors(instance)]


def test_the_seed_example_body_is_accepted_and_kept_for_kling(client: FlaskClient, runtime: Runtime) -> None:
    answer = client.post("/v1/jobs", json=SEED_BODY, headers=auth())
    assert answer.status_code == 202, answer.json
    request = runtime.store.request(answer.json["id"])
    assert request["watermark_info"] == {"enabled": True} and request["negative_prompt"] == ""
    assert "image_tail" not in request
    document = client.get("/openapi.json").json
    assert schema_errors(document, "JobRequest", SEED_BODY) == []
    assert schema_errors(document, "JobRequest", {**SEED_BODY, "image_tail": IMAGE}) != []


@pytest.mark.parametrize(("field", "value"), [("image_tail", IMAGE), ("image", IMAGE), ("cfg_scale", 0.5)])
def test_a_non_empty_single_image_field_is_still_422_with_the_reason(client: FlaskClient, field: str,
                                                                     value: object) -> None:
    answer = client.post("/v1/jobs", json={**SEED_BODY, field: value}, headers=auth())
    assert answer.status_code == 422
    [problem] = answer.json["fields"]
    assert problem["field"] == field and "single-image endpoint" in problem["problem"]


@pytest.fixture()
def models_client(redis_url: str) -> Iterator[tuple[FlaskClient, Runtime]]:
    celery_app = make_celery(redis_url)
    rt = Runtime.from_settings(app_settings(redis_url, KLING_MODELS="kling-v2-1-master,kling-v1-6"), celery_app)
    yield create_app(runtime=rt).test_client(), rt
    rt.redis.close()
    rt.http.close()
    celery_app.close()


def test_the_models_accepted_follow_kling_models(models_client: tuple[FlaskClient, Runtime]) -> None:
    client, rt = models_client
    body = {k: v for k, v in SEED_BODY.items() if k != "model_name"}
    answer = client.post("/v1/jobs", json=body, headers=auth())
    assert answer.status_code == 202, answer.json
    assert rt.store.request(answer.json["id"])["model_name"] == "kling-v2-1-master"  # the first is the default
    assert client.post("/v1/jobs", json=SEED_BODY, headers=auth()).status_code == 202
    refused = client.post("/v1/jobs", json={**SEED_BODY, "model_name": "kling-v9"}, headers=auth())
    assert refused.status_code == 422 and refused.json["fields"][0]["field"] == "model_name"
    enum = client.get("/openapi.json").json["components"]["schemas"]["JobRequest"]["properties"]["model_name"]
    assert enum["enum"] == ["kling-v2-1-master", "kling-v1-6", None]
