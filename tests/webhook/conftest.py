"""The Flask app over a real redis-server (tests/conftest.py), called through Flask's test client.

Kling, S3 and the broker's consumers are not needed here: nothing in these tests reaches Kling or S3, and queued
Celery messages are read back from Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from kling_relay.shared.queue import make_celery
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import Settings, load_settings
from kling_relay.webhook.app import create_app
from tests.support.settings_env import relay_env

TOKENS = ("first-api-token-0123456789", "second-api-token-0123456789")
CALLBACK_SECRET = "callback-secret-0123456789abcdef"


def app_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The app's environment: Kling and S3 on a closed port, both TOKENS, MAX_REQUEST_BYTES 200,000."""
    base = {"REDIS_URL": redis_url, "CALLBACK_SECRET": CALLBACK_SECRET, "API_TOKENS": ",".join(TOKENS),
            "S3_BUCKET": "bucket", "S3_ENDPOINT_URL": "http://127.0.0.1:9", "MAX_REQUEST_BYTES": "200000"}
    return relay_env(**{**base, **extra})


def app_settings(redis_url: str, **extra: str) -> Settings:
    return load_settings(app_env(redis_url, **extra))


@contextmanager
def open_runtime(settings: Settings) -> Iterator[Runtime]:
    """A Runtime on `settings` with its own Celery app (on the settings' Redis); closed on exit."""
    celery_app = make_celery(settings.redis_url)
    rt = Runtime.from_settings(settings, celery_app)
    try:
        yield rt
    finally:
        rt.redis.close()
        rt.http.close()
        celery_app.close()


@pytest.fixture()
def runtime(redis_url: str) -> Iterator[Runtime]:
    with open_runtime(app_settings(redis_url)) as rt:
        yield rt


@pytest.fixture()
def app(runtime: Runtime) -> Flask:
    return create_app(runtime=runtime)


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def auth(token: str = TOKENS[0]) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}
