"""The relay's requests session reads the proxy and CA variables once per host (shared/http_session.py), with the
same result as a plain `requests.Session`, and sees a change of any of them at the next request."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import requests

from kling_relay.shared import http_session

URLS = ["http://kling.example/v1/x", "https://cdn.example:8443/v.mp4?sig=1", "http://127.0.0.1:9000/b/k",
        "https://internal.corp/a"]
ENVS: list[dict[str, str]] = [
    {},
    {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "internal.corp,127.0.0.1"},
    {"http_proxy": "http://p1:1", "all_proxy": "http://p2:2", "REQUESTS_CA_BUNDLE": "/etc/ca.pem"},
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in http_session.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("env", ENVS)
def test_same_settings_as_requests(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ours, plain = http_session.Session(), requests.Session()
    for url in URLS * 2:  # the second round comes from the cache
        for args in [(None, None, None), (True, "/x.pem", None), (False, None, ("c", "k"))]:
            assert ours.merge_environment_settings(url, {}, *args) == plain.merge_environment_settings(url, {}, *args)


def test_environment_read_once_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = urllib.request.getproxies_environment

    def counted() -> Any:
        calls.append(1)
        return real()

    monkeypatch.setattr(urllib.request, "getproxies_environment", counted)
    session = http_session.Session()
    for _ in range(5):
        session.merge_environment_settings(URLS[0], {}, None, None, None)
    once = len(calls)
    assert once > 0
    for _ in range(5):
        session.merge_environment_settings(URLS[0].replace("/x", "/y"), {}, None, None, None)  # same host
    assert len(calls) == once
    session.merge_environment_settings(URLS[1], {}, None, None, None)  # another host: read again
    assert len(calls) > once


def test_a_changed_variable_is_seen_and_results_are_not_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    session = http_session.Session()
    first = session.merge_environment_settings(URLS[1], {}, None, None, None)
    assert first["proxies"] == {}
    first["proxies"]["https"] = "http://mutated:1"  # a caller's change does not leak into the cache
    assert session.merge_environment_settings(URLS[1], {}, None, None, None)["proxies"] == {}
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert session.merge_environment_settings(URLS[1], {}, None, None, None)["proxies"]["https"] == "http://proxy:3128"
    monkeypatch.setenv("NO_PROXY", "cdn.example")
    assert "https" not in session.merge_environment_settings(URLS[1], {}, None, None, None)["proxies"]


def test_the_relays_sessions_use_it() -> None:
    from kling_relay.shared.kling import KlingClient

    client = KlingClient("http://kling.example", api_key="k")
    assert isinstance(client._session, http_session.Session)
