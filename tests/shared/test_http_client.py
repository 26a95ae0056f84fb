"""The HTTP client against real local HTTP servers (answers scripted per test), its import weight, and `verify`.

The full API end to end (the real relay behind gunicorn) is in tests/e2e/test_http_client.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kling_relay.shared import notify
from kling_relay.shared.http_client import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    RelayClient,
    RelayError,
    TooManyActiveJobs,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimedOut,
    sign,
    verify,
)
from kling_relay.shared.settings import Secret
from tests.support.procs import free_port

TOKEN = "backend-token-0123456789abcdef"
HEAVY = ("celery", "kombu", "boto3", "botocore", "PIL", "jwt", "redis", "flask")


def job_json(state: str = "queued", job_id: str = "job_1", **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "state": state, "kling_task_id": None, "created_at": "2026-11-28T10:00:00.000Z",
            "updated_at": "2026-11-28T10:00:01.000Z", "error": None, "videos": [], "metadata": {},
            "notify_url": None, **extra}


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Script:
    """Answers given in order (the last one repeats); every request recorded with its arrival time."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def next(self, seen: Seen) -> Answer:
        with self.lock:
            self.seen.append(seen)
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Script

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        answer = self.script.next(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                       body, time.monotonic()))
        raw = answer.body if isinstance(answer.body, bytes) else (
            b"" if answer.body is None else json.dumps(answer.body).encode())
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.body is not None and not isinstance(answer.body, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = _handle  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    handler = type("Handler", (_Handler,), {"script": script})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def client_for(url: str, **options: Any) -> RelayClient:
    return RelayClient(url, TOKEN, **{"backoff": 0.01, "max_backoff": 0.05, "timeout": (2.0, 5.0), **options})


# --- import weight -------------------------------------------------------------------------------------------------

def test_importing_the_http_client_loads_none_of_the_relays_dependencies() -> None:
    """Issue: `from kling_relay.shared.client import Relay` loaded ~800 modules (celery, boto3, PIL, jwt...);
    a backend app's client must load requests and the standard library only."""
    code = ("import sys, json; import kling_relay.shared.http_client as m; "
            "from kling_relay.shared.http_client import RelayClient, verify; "
            f"print(json.dumps(sorted({{n.split('.')[0] for n in sys.modules}} & set({list(HEAVY)!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


# --- answers and errors ---------------------------------------------------------------------------------------------

def test_submit_sends_the_body_token_and_key_and_returns_a_typed_job(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(202, job_json(metadata={"order": 42}), {"Location": "/v1/jobs/job_1"})]
    job = client_for(url).submit(image_list=[{"image": "https://example.com/a.jpg"}], prompt="p",
                                 idempotency_key="order-42", metadata={"order": 42}, duration="5")
    [seen] = script.seen
    assert (seen.method, seen.path) == ("POST", "/v1/jobs")
    assert seen.headers["authorization"] == f"Bearer {TOKEN}" and seen.headers["idempotency-key"] == "order-42"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"image_list": [{"image": "https://example.com/a.jpg"}], "prompt": "p",
                                     "duration": "5", "metadata": {"order": 42}}
    assert job.id == "job_1" and job.state == "queued" and not job.finished and job.metadata == {"order": 42}
    assert job.created_at == datetime(2026, 11, 28, 10, 0, tzinfo=UTC) and job.events is None
    assert job.raw["id"] == "job_1"
    assert job.units is None and job.balance_deduction is None


def test_a_job_carries_what_kling_billed(server: tuple[str, Script]) -> None:
    """Issue 9 item 6: the job's `units` and `balance_deduction` reach the typed Job."""
    url, script = server
    script.answers = [Answer(200, job_json("stored", units=2, balance_deduction=0.28)),
                      Answer(200, job_json("stored", units="2", balance_deduction=True))]
    client = client_for(url)
    job = client.get("job_1")
    assert (job.units, job.balance_deduction) == (2.0, 0.28)
    odd = client.get("job_1")
    assert (odd.units, odd.balance_deduction) == (None, None)


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, {"error": "body is not valid JSON"}, BadRequest),
    (413, {"error": "body over 100 bytes"}, BadRequest),
    (401, {"error": "missing or invalid bearer token"}, Unauthorized),
    (404, {"error": "no such job"}, NotFound),
    (409, {"error": "the job is already stored", "state": "stored"}, Conflict),
    (500, {"error": "internal error"}, RelayError),
    (502, b"<html>bad gateway</html>", Unavailable),
])
def test_each_status_raises_its_error_with_the_apis_answer(server: tuple[str, Script], status: int, body: Any,
                                                           kind: type[RelayError]) -> None:
    url, script = server
    script.answers = [Answer(status, body)]
    with pytest.raises(kind) as info:
        client_for(url, retries=0).cancel("job_1", reason="r")
    assert type(info.value) is kind and info.value.status == status
    if isinstance(body, dict):
        assert info.value.body == body and info.value.message == body["error"]
    if kind is Conflict:
        assert isinstance(info.value, Conflict) and info.value.state == "stored"
    assert json.loads(script.seen[0].body) == {"reason": "r"}


def test_422_lists_every_field_problem(server: tuple[str, Script]) -> None:
    url, script = server
    fields = [{"field": "image_list", "problem": "must list 1 to 4 images"},
              {"field": "prompt", "problem": "is required"}]
    script.answers = [Answer(422, {"error": "invalid request", "fields": fields})]
    with pytest.raises(ValidationFailed) as info:
        client_for(url).submit(image_list=[], prompt="")
    assert [p.as_dict() for p in info.value.problems] == fields
    assert "image_list: must list 1 to 4 images" in str(info.value) and len(script.seen) == 1


def test_job_ids_are_quoted_into_one_path_segment(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(404, {"error": "no such job"})]
    with pytest.raises(NotFound):
        client_for(url).get("../status")
    assert script.seen[0].path == "/v1/jobs/..%2Fstatus"


# --- retries --------------------------------------------------------------------------------------------------------

def test_get_waits_as_long_as_retry_after_asks_then_succeeds(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "job store unavailable, try again shortly"}, {"Retry-After": "1"}),
                      Answer(200, job_json("stored"))]
    job = client_for(url).get("job_1")
    assert job.state == "stored" and len(script.seen) == 2
    assert script.seen[1].at - script.seen[0].at >= 1.0  # back-off alone would be ≤ 0.05 s


def test_retry_after_as_an_http_date_is_honoured(server: tuple[str, Script]) -> None:
    url, script = server
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    script.answers = [Answer(503, {"error": "busy"}, {"Retry-After": when}), Answer(200, {"submission": "open"})]
    assert client_for(url).status() == {"submission": "open"}
    assert script.seen[1].at - script.seen[0].at >= 0.5  # the date has one-second resolution


def test_get_gives_up_after_its_retries_with_retry_after(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "job store unavailable"}, {"Retry-After": "0"})]
    with pytest.raises(Unavailable) as info:
        client_for(url, retries=2).get("job_1")
    assert len(script.seen) == 3 and info.value.status == 503 and info.value.retry_after == 0.0


def test_a_retry_after_longer_than_allowed_is_not_waited_for(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "down"}, {"Retry-After": "3600"})]
    with pytest.raises(Unavailable) as info:
        client_for(url, max_retry_after=5).list()
    assert len(script.seen) == 1 and info.value.retry_after == 3600.0


def test_submit_without_a_key_is_not_retried_after_a_503(server: tuple[str, Script]) -> None:
    """A 503 to a POST may come after the job was stored: without an idempotency key a second POST could make a
    second job, so the client does not send it."""
    url, script = server
    script.answers = [Answer(503, {"error": "down"}, {"Retry-After": "0"}), Answer(202, job_json())]
    with pytest.raises(Unavailable) as info:
        client_for(url).submit(image_list=[{"image": "https://e.com/a.jpg"}], prompt="p")
    assert len(script.seen) == 1 and info.value.retry_after == 0.0


def test_submit_with_a_key_is_retried_with_the_same_key_and_body(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "down"}, {"Retry-After": "0"}), Answer(202, job_json())]
    job = client_for(url).submit(image_list=[{"image": "https://e.com/a.jpg"}], prompt="p", idempotency_key="k-1")
    assert job.id == "job_1" and len(script.seen) == 2
    assert [s.headers["idempotency-key"] for s in script.seen] == ["k-1", "k-1"]
    assert script.seen[0].body == script.seen[1].body


@pytest.mark.parametrize("action", ["retry", "cancel"])
def test_ops_actions_are_not_retried_after_an_answer(server: tuple[str, Script], action: str) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "down"}, {"Retry-After": "0"}), Answer(200, job_json("canceled"))]
    with pytest.raises(Unavailable):
        getattr(client_for(url), action)("job_1")
    assert len(script.seen) == 1 and script.seen[0].path == f"/v1/jobs/job_1/{action}"
    assert script.seen[0].body == b""  # no reason, no body


def test_an_unreachable_relay_is_unavailable_without_a_status() -> None:
    client = client_for(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(Unavailable) as info:
        client.cancel("job_1")  # connection refused: nothing was sent, so even cancel may try again
    assert info.value.status is None and "unreachable" in str(info.value)
    with pytest.raises(Unavailable):
        client.get("job_1")


def test_the_token_is_never_in_repr_errors_or_logs(server: tuple[str, Script],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    url, script = server
    script.answers = [Answer(503, {"error": "down"}, {"Retry-After": "0"})]
    client = client_for(url, retries=2)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unavailable) as info:
        client.get("job_1")
    assert caplog.records and "relay unavailable, retrying" in caplog.text
    for text in (repr(client), str(client.__dict__.get("base_url")), str(info.value), repr(info.value), caplog.text,
                 *(json.dumps(r.__dict__, default=str) for r in caplog.records)):
        assert TOKEN not in text


# --- wait and paging ------------------------------------------------------------------------------------------------

def test_wait_polls_until_finished_through_a_503_honouring_retry_after(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(200, job_json("queued")), Answer(200, job_json("processing")),
                      Answer(503, {"error": "job store unavailable"}, {"Retry-After": "1"}),
                      Answer(200, job_json("stored", videos=[{"key": "k", "bytes": 1}]))]
    states: list[str] = []
    job = client_for(url).wait("job_1", timeout=30, poll=0.01, max_poll=0.02,
                               on_change=lambda j: states.append(j.state))
    assert job.state == "stored" and job.videos == [{"key": "k", "bytes": 1}]
    assert states == ["queued", "processing", "stored"] and len(script.seen) == 4
    assert script.seen[3].at - script.seen[2].at >= 1.0


def test_wait_times_out_with_the_last_job(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(200, job_json("processing"))]
    with pytest.raises(WaitTimedOut) as info:
        client_for(url).wait("job_1", timeout=0.3, poll=0.05)
    assert isinstance(info.value, TimeoutError) and info.value.job is not None
    assert info.value.job.state == "processing" and "still processing" in str(info.value)


def test_list_and_iter_jobs_follow_the_cursor(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(200, {"jobs": [job_json(job_id="job_3"), job_json(job_id="job_2")], "next_cursor": "c1"}),
                      Answer(200, {"jobs": [job_json(job_id="job_1")], "next_cursor": None})]
    ids = [j.id for j in client_for(url).iter_jobs(state="queued", page_size=2)]
    assert ids == ["job_3", "job_2", "job_1"]
    assert [s.path for s in script.seen] == ["/v1/jobs?limit=2&state=queued", "/v1/jobs?limit=2&state=queued&cursor=c1"]


def test_from_env_needs_the_url_and_a_token(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="KLING_RELAY_URL and KLING_RELAY_TOKEN"):
        RelayClient.from_env({})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    client = RelayClient.from_env({"KLING_RELAY_URL": "https://relay.example.com/",
                                   "KLING_RELAY_TOKEN_FILE": str(token_file)})
    assert client.base_url == "https://relay.example.com" and TOKEN not in repr(client)
    with pytest.raises(ValueError, match="http"):
        RelayClient("relay.example.com", TOKEN)


# --- verify ---------------------------------------------------------------------------------------------------------

# The example of the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _headers(msg_id: str, ts: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_verify_a_whsec_secret_against_the_specification_example() -> None:
    headers = _headers(SPEC_ID, SPEC_TS, SPEC_SIGNATURE)
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)
    assert verify(SPEC_SECRET, headers, SPEC_BODY.decode(), now=SPEC_TS)  # the body as text works too
    assert not verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now=SPEC_TS)  # tampered body
    assert not verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 301)  # stale
    assert not verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS - 301)  # from the future
    assert not verify("whsec_" + "QUJD" * 8, headers, SPEC_BODY, now=SPEC_TS)  # another secret
    assert verify(SPEC_SECRET, {**headers, "webhook-signature": "v1,bm9wZQ== " + SPEC_SIGNATURE}, SPEC_BODY,
                  now=SPEC_TS)
    assert verify(SPEC_SECRET, {k.title(): v for k, v in headers.items()}, SPEC_BODY, now=SPEC_TS)  # any case
    assert not verify(SPEC_SECRET, {"webhook-id": SPEC_ID}, SPEC_BODY, now=SPEC_TS)
    assert not verify(SPEC_SECRET, {**headers, "webhook-timestamp": "soon"}, SPEC_BODY, now=SPEC_TS)


def test_verify_takes_a_plain_string_secret_round_trip_with_the_relays_signer() -> None:
    """Issue 8: the relay signs with NOTIFY_SECRET as a plain string; a receiver passes that same string."""
    body = b'{"type":"job.stored"}'
    now = int(time.time())
    signature = notify.sign(Secret("a-plain-notify-secret"), "msg_1", now, body)
    headers = _headers("msg_1", now, signature)
    assert verify("a-plain-notify-secret", headers, body)
    assert not verify("another-plain-secret", headers, body)
    assert not verify("a-plain-notify-secret", _headers("msg_2", now, signature), body)
    assert not verify("a-plain-notify-secret", headers, body, now=now + 3600)
    assert verify("a-plain-notify-secret", headers, body, now=now + 3600, tolerance=7200)


def test_notify_verify_accepts_a_plain_string_secret() -> None:
    """Before: `notify.verify` called `.reveal()` on the secret, so a plain string raised AttributeError."""
    headers = _headers(SPEC_ID, SPEC_TS, SPEC_SIGNATURE)
    assert notify.verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS)
    assert notify.verify(Secret(SPEC_SECRET), headers, SPEC_BODY, now=SPEC_TS)
    signature = sign("plain", "m", SPEC_TS, b"x")
    assert notify.verify("plain", _headers("m", SPEC_TS, signature), b"x", now=SPEC_TS)


def test_a_whsec_secret_that_is_not_base64_is_an_error() -> None:
    with pytest.raises(ValueError, match="base64"):
        verify("whsec_not*base64", _headers(SPEC_ID, SPEC_TS, SPEC_SIGNATURE), SPEC_BODY, now=SPEC_TS)


# --- apps and operators (issue 13) ----------------------------------------------------------------------------------

def test_an_apps_cap_is_a_typed_error_never_retried(server: tuple[str, Script]) -> None:
    """A 429 at submit for APP_MAX_ACTIVE_JOBS: TooManyActiveJobs (an Unavailable) with retry_after, sent once even
    with an idempotency key (waiting would not help); the job's `app` is read from the answer."""
    url, script = server
    script.answers = [Answer(429, {"error": "this app has 2 jobs ...", "limit": "APP_MAX_ACTIVE_JOBS", "active": 2},
                             {"Retry-After": "30"})]
    with pytest.raises(TooManyActiveJobs) as info:
        client_for(url).submit(image_list=[{"image": "https://example.com/a.jpg"}], prompt="p", idempotency_key="k")
    assert isinstance(info.value, Unavailable) and info.value.retry_after == 30 and len(script.seen) == 1
    script.answers = [Answer(202, job_json(app="web"))]
    assert client_for(url).submit(image_list=[{"image": "https://example.com/a.jpg"}], prompt="p").app == "web"


def test_an_ops_route_with_an_app_token_is_forbidden(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(403, {"error": "this route is for operators (OPS_TOKENS)"})]
    with pytest.raises(Forbidden):
        client_for(url).status()
