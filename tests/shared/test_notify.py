"""Standard Webhooks signing and delivery, against a real local HTTP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from kling_relay.shared.notify import NotifyError, deliver, event_payload, publish, sign, verify
from kling_relay.shared.settings import Secret
from kling_relay.shared.urlguard import UrlAllowlist
from tests.support.receiver import Receiver, serve_receiver

LOCAL = UrlAllowlist.parse("http://127.0.0.1", name="NOTIFY_URL_ALLOWLIST")

# The example of the Standard Webhooks specification (standard-webhooks/standard-webhooks, spec and libraries).
SPEC_SECRET = Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_specification_example() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_verify_accepts_good_and_refuses_tampered_or_stale() -> None:
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIGNATURE}
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)
    assert not verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now=SPEC_TS + 10)
    assert not verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 3600)
    assert not verify(Secret("whsec_" + "QUJD" * 8), headers, SPEC_BODY, now=SPEC_TS)
    assert not verify(SPEC_SECRET, {"webhook-id": SPEC_ID}, SPEC_BODY, now=SPEC_TS)
    several = {**headers, "webhook-signature": "v1,bm9wZQ== " + SPEC_SIGNATURE}
    assert verify(SPEC_SECRET, several, SPEC_BODY, now=SPEC_TS)


@pytest.fixture()
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    with serve_receiver("/hook") as served:
        yield served


def test_deliver_posts_a_signed_body(receiver: tuple[str, type[Receiver]]) -> None:
    url, handler = receiver
    secret = Secret("a-plain-notify-secret")
    status = deliver(url, secret, "msg_1", {"type": "job.stored", "data": {"id": "job_1"}},
                     session=requests.Session(), allowlist=LOCAL)
    assert status == 204
    headers, body = handler.seen[0]
    assert json.loads(body) == {"type": "job.stored", "data": {"id": "job_1"}}
    assert headers["webhook-id"] == "msg_1" and headers["content-type"] == "application/json"
    assert verify(secret, headers, body)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True), (408, True),
                                                   (400, False), (404, False), (410, False)])
def test_deliver_classifies_failures(receiver: tuple[str, type[Receiver]], status: int, retryable: bool) -> None:
    url, handler = receiver
    handler.status = status
    with pytest.raises(NotifyError) as info:
        deliver(url, Secret("s"), "msg_1", {}, session=requests.Session(), allowlist=LOCAL)
    assert info.value.retryable is retryable and str(status) in str(info.value)


def test_deliver_unreachable_is_retryable() -> None:
    from tests.support.procs import free_port

    with pytest.raises(NotifyError) as info:
        deliver(f"http://127.0.0.1:{free_port()}/", Secret("s"), "m", {}, session=requests.Session(),
                allowlist=LOCAL, timeout=(1, 1))
    assert info.value.retryable


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/hook", "https://127.0.0.1:{port}/hook",
                                    "https://169.254.169.254/latest/meta-data/", "https://[::1]:{port}/",
                                    "https://2130706433:{port}/", "https://localhost:{port}/"])
def test_default_allowlist_refuses_internal_targets(receiver: tuple[str, type[Receiver]], target: str) -> None:
    url, handler = receiver
    port = url.split(":")[2].split("/")[0]
    default = UrlAllowlist.parse("*", name="NOTIFY_URL_ALLOWLIST")
    with pytest.raises(NotifyError) as info:
        deliver(target.format(port=port), Secret("s"), "m", {}, session=requests.Session(), allowlist=default,
                timeout=(1, 1))
    assert not info.value.retryable and "refused" in str(info.value)
    assert handler.seen == []


def test_redirects_are_not_followed(receiver: tuple[str, type[Receiver]]) -> None:
    url, handler = receiver
    handler.status = 307
    with pytest.raises(NotifyError) as info:
        deliver(url, Secret("s"), "m", {}, session=requests.Session(), allowlist=LOCAL)
    assert not info.value.retryable and len(handler.seen) == 1


def test_a_huge_answer_is_not_read(tmp_path: Any) -> None:
    """The receiver answers 200 with an endless body: delivery returns at once without reading it."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        try:
            for _ in range(1000):
                conn.sendall(b"x" * 65536)
        except OSError:
            pass
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    status = deliver(f"http://127.0.0.1:{port}/", Secret("s"), "m", {}, session=requests.Session(), allowlist=LOCAL)
    assert status == 200
    listener.close()


def test_publish_appends_one_entry(redis_client: redis.Redis) -> None:
    job = {"id": "job_1", "state": "stored", "videos": [], "updated_at": "2026-05-01T12:00:00.123Z",
           "events": [{"to": "stored"}]}
    publish(redis_client, "events", job, maxlen=100)
    [(_, fields)] = redis_client.xrange("events")
    assert fields["job_id"] == "job_1" and fields["state"] == "stored" and fields["at"] == job["updated_at"]
    payload = json.loads(fields["payload"])
    assert payload["type"] == "job.stored" and "events" not in payload["data"]
    assert payload["timestamp"] == job["updated_at"]
    assert event_payload(job)["data"]["id"] == "job_1"
