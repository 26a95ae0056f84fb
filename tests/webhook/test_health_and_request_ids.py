"""`/healthz` says what the README says and no more; every answer carries an `X-Request-ID`."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from kling_relay.shared.logs import JsonFormatter
from kling_relay.shared.queue import make_celery
from kling_relay.shared.runtime import Runtime
from kling_relay.webhook.app import create_app
from tests.support.procs import free_port
from tests.webhook.conftest import app_settings, auth

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture()
def redis_down_app() -> Iterator[Flask]:
    """The app with its Redis on a port where nothing listens."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    celery_app = make_celery(url)
    rt = Runtime.from_settings(app_settings(url), celery_app)
    yield create_app(runtime=rt)
    rt.redis.close()
    rt.http.close()
    celery_app.close()


def readme_health_503() -> dict[str, object]:
    section = README.read_text().split("**`GET /healthz`**", 1)[1].split("**`GET /openapi.json`**", 1)[0]
    match = re.search(r"`503 (\{.*?\})`", section)
    assert match, "README documents the 503 body of /healthz"
    documented: dict[str, object] = json.loads(match.group(1))
    return documented


def test_health_503_is_what_the_readme_says_and_names_no_component(redis_down_app: Flask) -> None:
    """Issue: the 503 body said `"redis": "unreachable"` while the README promised no details."""
    answer = redis_down_app.test_client().get("/healthz")
    assert answer.status_code == 503
    assert answer.json == readme_health_503() == {"status": "unhealthy"}
    assert "redis" not in answer.get_data(as_text=True).lower()
    assert answer.headers["Retry-After"] == "5"


def test_health_failure_is_logged_with_its_cause_and_request_id(redis_down_app: Flask) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kling_relay.webhook.app")
    logger.addHandler(handler)
    try:
        answer = redis_down_app.test_client().get("/healthz", headers={"X-Request-ID": "probe-7"})
    finally:
        logger.removeHandler(handler)
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["msg"] == "health check failed" and record["error"] == "ConnectionError"
    assert record["request_id"] == answer.headers["X-Request-ID"] == "probe-7"


def test_health_ok_body(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok", "submission": "open", "copy": "open"}


@pytest.mark.parametrize("sent", ["abc-123", "trace.id:1_a", "x" * 128])
def test_a_sane_request_id_is_kept(client: FlaskClient, sent: str) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": sent}).headers["X-Request-ID"] == sent


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "a\x1bb", '{"level":"error"}', "é"])
def test_an_unsafe_request_id_is_replaced(client: FlaskClient, sent: str) -> None:
    got = client.get("/healthz", headers={"X-Request-ID": sent}).headers["X-Request-ID"]
    assert got != sent and re.fullmatch(r"[0-9a-f]{32}", got)


def test_every_answer_has_a_fresh_request_id(client: FlaskClient) -> None:
    answers = [client.get("/healthz"), client.get("/v1/jobs"), client.get("/nowhere"),
               client.get("/v1/jobs/job_nope", headers=auth())]
    assert [a.status_code for a in answers] == [200, 401, 404, 404]
    ids = [a.headers["X-Request-ID"] for a in answers]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_readyz_is_200_while_redis_answers(client: FlaskClient) -> None:
    """Issue 12.3: Kubernetes' readiness probe (deploy/k8s/base/web.yaml) asks /readyz."""
    answer = client.get("/readyz")
    assert answer.status_code == 200 and answer.json == {"status": "ready"}


def test_readyz_is_503_without_redis_and_names_no_component(redis_down_app: Flask) -> None:
    """Issue 12.3: a web pod whose Redis is away must leave the Service's endpoints (readiness fails)."""
    answer = redis_down_app.test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.json == {"status": "unready"}
    assert answer.headers["Retry-After"] == "5"
    assert "redis" not in answer.get_data(as_text=True).lower()


def test_liveness_does_not_touch_redis(redis_down_app: Flask) -> None:
    """The k8s liveness probe pointed at /healthz, which fails while Redis is down: every web pod would be restarted
    by a Redis outage, which a restart cannot fix. /livez answers while the process does, whatever Redis does."""
    client = redis_down_app.test_client()
    assert client.get("/healthz").status_code == 503
    answer = client.get("/livez")
    assert answer.status_code == 200
    assert answer.json == {"status": "alive"}


def test_a_web_worker_starts_without_boto3_or_pyjwt() -> None:
    """Issue 11: gunicorn replaces a web worker every ~10,000 requests, and the new worker imports and builds the app
    again. That was about 1.2 s of CPU, of which boto3 (its import and an S3 client, ~0.4 s) and PyJWT with
    `cryptography` (~0.1 s), though the web process never signs a Kling token and reaches S3 only for a presigned
    link on the dashboard. Both now load on first use, and still work then."""
    import subprocess
    import sys

    from tests.webhook.conftest import app_env

    code = ("import sys, json\n"
            "from kling_relay.webhook.app import create_app\n"
            "app = create_app()\n"
            "rt = app.extensions['kling_relay']\n"
            "loaded = lambda: sorted({n.split('.')[0] for n in sys.modules} & {'boto3', 'jwt'})\n"
            "print(json.dumps(loaded()))\n"
            "rt.storage.s3.meta.service_model.service_name\n"
            "print(json.dumps(loaded()))\n"
            "from kling_relay.shared.kling_auth import JwtTokenSource\n"
            "print(json.dumps(JwtTokenSource('ak', 'sk').token().count('.')))\n")
    env = {**app_env(f"redis://127.0.0.1:{free_port()}/0"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    assert [json.loads(line) for line in out] == [[], ["boto3"], 2]
