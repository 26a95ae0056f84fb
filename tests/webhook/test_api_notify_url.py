"""`POST /v1/jobs` with a `notify_url` that names an address delivery would refuse: 422 at submit, nothing stored.

Through the Flask app on a real redis-server, with `NOTIFY_SECRET` set and the default `NOTIFY_URL_ALLOWLIST`
(`*`: any public https host).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from kling_relay.shared.queue import SUBMIT_QUEUE
from kling_relay.shared.runtime import Runtime
from kling_relay.webhook.app import create_app
from tests.shared.test_ops import REQUEST
from tests.webhook.conftest import app_settings, auth, open_runtime


@pytest.fixture()
def notify_runtime(redis_url: str) -> Iterator[Runtime]:
    with open_runtime(app_settings(redis_url, NOTIFY_SECRET="notify-secret-0123456789")) as rt:
        yield rt


@pytest.fixture()
def notify_client(notify_runtime: Runtime) -> FlaskClient:
    return create_app(runtime=notify_runtime).test_client()


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/x", "https://169.254.169.254/x", "https://[::1]/x", "https://[fe80::1]/x",
    "https://[::ffff:127.0.0.1]/x", "https://2130706433/", "https://0x7f.1/", "https://0.0.0.0/",
    "https://10.0.0.1/x", "https://192.168.1.1/x", "https://224.0.0.1/x",
])
def test_a_private_literal_notify_url_is_422_at_submit_and_nothing_is_stored(
        notify_client: FlaskClient, notify_runtime: Runtime, url: str) -> None:
    """Issue 7: these got a 202 and were refused only at delivery."""
    response = notify_client.post("/v1/jobs", json={**REQUEST, "notify_url": url}, headers=auth())
    assert response.status_code == 422, response.json
    assert response.json is not None
    assert [f["field"] for f in response.json["fields"]] == ["notify_url"]
    assert "non-public address" in response.json["fields"][0]["problem"]
    assert notify_runtime.store.list()[0] == []
    assert notify_runtime.redis.llen(SUBMIT_QUEUE) == 0


def test_a_public_notify_url_is_accepted(notify_client: FlaskClient, notify_runtime: Runtime) -> None:
    response = notify_client.post("/v1/jobs", json={**REQUEST, "notify_url": "https://93.184.216.34/hook"},
                                  headers=auth())
    assert response.status_code == 202, response.json
    assert response.json is not None and response.json["notify_url"] == "https://93.184.216.34/hook"


HOOK = "https://93.184.216.34/hook"


@pytest.mark.parametrize(("extra", "problems"), [
    ({"notify_url": HOOK, "notify_events": ["stored", "finished"]}, [("notify_events[1]", "must be one of")]),
    ({"notify_url": HOOK, "notify_events": ["stored", "queued"]}, [("notify_events[1]", "must be one of")]),
    ({"notify_url": HOOK, "notify_events": ["stored", "failed", "stored"]}, [("notify_events", "twice")]),
    ({"notify_url": HOOK, "notify_events": []}, [("notify_events", "non-empty list")]),
    ({"notify_url": HOOK, "notify_events": "stored"}, [("notify_events", "non-empty list")]),
    ({"notify_events": ["processing"]}, [("notify_events", "needs notify_url")]),
    ({"notify_url": None, "notify_events": ["stored", "stored"]},
     [("notify_events", "twice"), ("notify_events", "needs notify_url")]),
])
def test_bad_notify_events_are_422_naming_the_field_and_nothing_is_stored(
        notify_client: FlaskClient, notify_runtime: Runtime, extra: dict[str, object],
        problems: list[tuple[str, str]]) -> None:
    """Issue 8.8: `notify_events` (the states a job's notify_url hears of) was refused as an unknown field; now
    an unknown state, a duplicate, an empty list or a list without notify_url are 422 on that field."""
    response = notify_client.post("/v1/jobs", json={**REQUEST, **extra}, headers=auth())
    assert response.status_code == 422, response.json
    assert response.json is not None
    got = [(f["field"], f["problem"]) for f in response.json["fields"]]
    assert [field for field, _ in got] == [field for field, _ in problems], got
    assert all(words in problem for (_, problem), (_, words) in zip(got, problems, strict=True)), got
    assert notify_runtime.store.list()[0] == []
    assert notify_runtime.redis.llen(SUBMIT_QUEUE) == 0


def test_notify_events_are_accepted_shown_and_defaulted(notify_client: FlaskClient) -> None:
    chosen = notify_client.post("/v1/jobs", json={**REQUEST, "notify_url": HOOK,
                                                  "notify_events": ["stored", "processing", "canceled"]},
                                headers=auth())
    assert chosen.status_code == 202, chosen.json
    assert chosen.json is not None and chosen.json["notify_events"] == ["processing", "stored", "canceled"]
    default = notify_client.post("/v1/jobs", json={**REQUEST, "notify_url": HOOK}, headers=auth())
    assert default.json is not None and default.json["notify_events"] == ["stored", "failed", "canceled"]
