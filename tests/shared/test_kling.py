"""Tests for shared/kling.py and shared/kling_auth.py.

Pure parts (JWT claims and caching, the code-to-kind table, task parsing) are tested directly; the
transport over real HTTP, against a tiny scripted http.server for answers and faults the Kling
simulator has no knob for, and against the simulator itself (tests further down).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from kling_relay.shared.kling import (
    ErrorKind,
    KlingAmbiguous,
    KlingClient,
    KlingError,
    KlingFixAccount,
    KlingFixRequest,
    KlingLookupIncomplete,
    KlingProtocolError,
    KlingRetryLater,
    KlingTask,
    KlingTaskNotFound,
    KlingVideo,
    error_for,
    kind_for_code,
)
from kling_relay.shared.kling_auth import JwtTokenSource, StaticApiKey
from tests.support.clock import FakeClock, SkewedClock
from tests.support.procs import free_port
from tests.support.sim import SimHandle, running_simulator, start_simulator

AK, API_KEY = "ak-test-0001", "static-key-very-secret"
SK = "sk-test-secret-0001-long-enough-for-pyjwt"  # >= 32 bytes, so jwt.decode in tests does not warn
T0 = 1_700_000_000.0


def task_json(task_id: str = "t-1", status: str = "submitted", external_task_id: str | None = "job-1",
              **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": "",
                           "task_info": {"external_task_id": external_task_id},
                           "created_at": 1_700_000_000_000, "updated_at": 1_700_000_000_500}
    obj.update(extra)
    return obj


def envelope(code: int = 0, data: Any = None, message: str = "SUCCEED", request_id: str = "req-1") -> bytes:
    return json.dumps({"code": code, "message": message, "request_id": request_id, "data": data}).encode()


# ------------------------------------------------------------------------------------------- JWT auth

def decode(token: str) -> dict[str, Any]:
    return jwt.decode(token, SK, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})


def test_jwt_header_and_claims_follow_kling_docs() -> None:
    source = JwtTokenSource(AK, SK, clock=FakeClock(T0 + 0.7))
    token = source.token()
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert decode(token) == {"iss": AK, "exp": int(T0) + 1800, "nbf": int(T0) - 5}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-that-is-32-bytes-long", algorithms=["HS256"], options={"verify_exp": False})


def test_short_secret_keys_sign_without_warnings() -> None:
    # Kling issues the keys; PyJWT's "HMAC key below 32 bytes" warning must not fire (warnings are errors).
    token = JwtTokenSource(AK, "short-sk", clock=FakeClock(T0)).token()
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(b"short-sk", signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected
    payload = signing_input.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iss"] == AK


def test_jwt_is_reused_until_less_than_the_margin_is_left() -> None:
    clock = FakeClock(T0)
    source = JwtTokenSource(AK, SK, clock=clock)
    first = source.token()
    clock.now = T0 + 1499  # 301 s left: still reused
    assert source.token() == first
    clock.now = T0 + 1501  # 299 s left: renewed
    second = source.token()
    assert second != first
    assert decode(second)["exp"] == int(T0) + 1501 + 1800
    assert source.token() == second


def test_jwt_renew_margin_is_configurable() -> None:
    clock = FakeClock(T0)
    source = JwtTokenSource(AK, SK, clock=clock, renew_margin=60)
    first = source.token()
    clock.now = T0 + 1739  # 61 s left
    assert source.token() == first
    clock.now = T0 + 1741
    assert source.token() != first
    with pytest.raises(ValueError):
        JwtTokenSource(AK, SK, renew_margin=1800)


def test_jwt_renew_replaces_only_the_stale_token() -> None:
    clock = FakeClock(T0)
    source = JwtTokenSource(AK, SK, clock=clock)
    stale = source.token()
    clock.now += 10
    fresh = source.renew(stale)
    assert fresh != stale and source.token() == fresh
    clock.now += 10
    # another thread still holding `stale` must get the already renewed token, not a third one
    assert source.renew(stale) == fresh


def test_jwt_cache_is_shared_between_threads() -> None:
    source = JwtTokenSource(AK, SK, clock=FakeClock(T0))
    tokens: list[str] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        tokens.append(source.token())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tokens) == 8 and len(set(tokens)) == 1


def test_credentials_never_show_in_reprs() -> None:
    jwt_client = KlingClient("https://api.example.com/kling/", access_key=AK, secret_key=SK)
    key_client = KlingClient("https://api.example.com", api_key=API_KEY)
    try:
        for obj in (jwt_client, key_client, JwtTokenSource(AK, SK), StaticApiKey(API_KEY)):
            text = repr(obj) + str(obj)
            for secret in (AK, SK, API_KEY):
                assert secret not in text
        assert repr(jwt_client) == "KlingClient(base_url='https://api.example.com/kling', auth='jwt')"
        assert repr(key_client) == "KlingClient(base_url='https://api.example.com', auth='api_key')"
    finally:
        jwt_client.close()
        key_client.close()


@pytest.mark.parametrize("kwargs", [
    {},
    {"access_key": AK},
    {"secret_key": SK},
    {"access_key": AK, "secret_key": SK, "api_key": API_KEY},
    {"access_key": AK, "api_key": API_KEY},
    {"api_key": ""},
    {"access_key": "", "secret_key": SK},
])
def test_exactly_one_auth_mode(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        KlingClient("https://api.example.com", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("base_url", ["api.example.com", "ftp://api.example.com", "https://", "https://h/?q=1",
                                      "https://user:pw@api.example.com"])
def test_base_url_must_be_http(base_url: str) -> None:
    with pytest.raises(ValueError):
        KlingClient(base_url, api_key=API_KEY)


@pytest.mark.parametrize("timeout", [0, -1, (5.0, 0), (1.0, 2.0, 3.0)])
def test_timeout_must_be_positive(timeout: Any) -> None:
    with pytest.raises(ValueError):
        KlingClient("https://api.example.com", api_key=API_KEY, timeout=timeout)


# ------------------------------------------------------------------------------------- error mapping

# Every documented code, with the HTTP status Kling pairs it with and the kind the client must give.
DOCUMENTED_CODES = [
    (401, 1000, ErrorKind.FIX_ACCOUNT), (401, 1001, ErrorKind.FIX_ACCOUNT), (401, 1002, ErrorKind.FIX_ACCOUNT),
    (401, 1003, ErrorKind.FIX_ACCOUNT), (401, 1004, ErrorKind.FIX_ACCOUNT),
    (429, 1100, ErrorKind.FIX_ACCOUNT), (429, 1101, ErrorKind.FIX_ACCOUNT), (429, 1102, ErrorKind.FIX_ACCOUNT),
    (403, 1103, ErrorKind.FIX_ACCOUNT),
    (400, 1200, ErrorKind.FIX_REQUEST), (400, 1201, ErrorKind.FIX_REQUEST), (404, 1202, ErrorKind.FIX_REQUEST),
    (404, 1203, ErrorKind.NOT_FOUND),
    (400, 1300, ErrorKind.FIX_REQUEST), (400, 1301, ErrorKind.FIX_REQUEST),
    (429, 1302, ErrorKind.RETRY_LATER), (429, 1303, ErrorKind.RETRY_LATER),
    (429, 1304, ErrorKind.FIX_ACCOUNT),
    (500, 5000, ErrorKind.RETRY_LATER), (503, 5001, ErrorKind.RETRY_LATER), (504, 5002, ErrorKind.RETRY_LATER),
]
KIND_CLASSES = {
    ErrorKind.FIX_ACCOUNT: KlingFixAccount, ErrorKind.FIX_REQUEST: KlingFixRequest,
    ErrorKind.NOT_FOUND: KlingTaskNotFound, ErrorKind.RETRY_LATER: KlingRetryLater,
    ErrorKind.AMBIGUOUS: KlingAmbiguous, ErrorKind.PROTOCOL: KlingProtocolError,
}


@pytest.mark.parametrize(("status", "code", "kind"), DOCUMENTED_CODES)
def test_every_documented_code_has_its_kind(status: int, code: int, kind: ErrorKind) -> None:
    assert kind_for_code(code, status) is kind
    assert kind_for_code(code, 200) is kind  # the code decides, not the HTTP status


@pytest.mark.parametrize(("status", "kind"), [
    (500, ErrorKind.RETRY_LATER), (502, ErrorKind.RETRY_LATER), (400, ErrorKind.FIX_REQUEST),
    (429, ErrorKind.FIX_REQUEST), (200, ErrorKind.FIX_REQUEST), (None, ErrorKind.FIX_REQUEST),
])
def test_unknown_codes_go_by_http_status(status: int | None, kind: ErrorKind) -> None:
    assert kind_for_code(1999, status) is kind


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_error_classes_match_kinds(kind: ErrorKind) -> None:
    err = error_for(kind, "boom", http_status=429, code=1302, request_id="r-9")
    assert type(err) is KIND_CLASSES[kind] and err.kind is kind
    assert isinstance(err, KlingError)
    assert err.retryable is (kind is ErrorKind.RETRY_LATER)
    text = str(err)
    assert "1302" in text and "boom" in text and "r-9" in text and "429" in text
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is type(err) and str(clone) == text and clone.code == 1302


def test_not_found_is_a_fix_request() -> None:
    assert issubclass(KlingTaskNotFound, KlingFixRequest)


# ------------------------------------------------------------------------------------- task parsing

def test_task_from_json_reads_every_field() -> None:
    obj = task_json("t-9", "succeed", "job-9", task_status_msg="done", task_result={"videos": [
        {"id": "v1", "url": "https://cdn.example.com/a.mp4", "duration": "5.1"},
        {"id": 7, "url": "https://cdn.example.com/b.mp4", "duration": 10},
    ]})
    task = KlingTask.from_json(obj)
    assert task == KlingTask(
        task_id="t-9", status="succeed", status_msg="done", external_task_id="job-9",
        created_at_ms=1_700_000_000_000, updated_at_ms=1_700_000_000_500,
        videos=(KlingVideo("v1", "https://cdn.example.com/a.mp4", "5.1"),
                KlingVideo("7", "https://cdn.example.com/b.mp4", "10")))
    assert task.is_final


def test_watermark_url_is_read_beside_url() -> None:
    """Issue 9 item 5: with watermark_info enabled Kling returns `watermark_url` beside `url`; an odd one is left
    out rather than making the task (and its billed video) unreadable."""
    videos = [{"id": "v1", "url": "https://cdn.example.com/a.mp4", "duration": "5",
               "watermark_url": "https://cdn.example.com/a-wm.mp4"},
              {"id": "v2", "url": "https://cdn.example.com/b.mp4", "watermark_url": 12},
              {"id": "v3", "url": "https://cdn.example.com/c.mp4", "watermark_url": ""}]
    task = KlingTask.from_json(task_json("t", "succeed", "job-1", task_result={"videos": videos}))
    assert [v.watermark_url for v in task.videos] == ["https://cdn.example.com/a-wm.mp4", None, None]


def test_task_from_json_minimal() -> None:
    task = KlingTask.from_json({"task_id": "t", "task_status": "processing", "task_info": None})
    assert task == KlingTask(task_id="t", status="processing")
    assert not task.is_final


@pytest.mark.parametrize(("raw", "units"), [
    ("1", 1.0), ("0.5", 0.5), (" 3.5 ", 3.5), (2, 2.0), (1.25, 1.25), ("0", 0.0),
    (None, None), ("", None),
    # garbage is read as "unknown", never a refused task: its status matters more than its bill
    ("one", None), ("-1", None), (-2, None), ("nan", None), ("inf", None), (float("inf"), None), (True, None),
    ([1], None), ({"units": 1}, None), (10**400, None), ("9" * 40, None),
])
def test_task_from_json_reads_the_deduction_leniently(raw: Any, units: float | None) -> None:
    """Issue 9 item 6: `final_unit_deduction` (a string such as "1" per the docs, or a number) and a callback's
    `final_balance_deduction` are kept on the task; an unreadable one is None and the task still parses."""
    task = KlingTask.from_json({**task_json("t-1", "succeed", "job-1"), "final_unit_deduction": raw,
                                "final_balance_deduction": raw})
    assert task.status == "succeed"
    assert task.final_unit_deduction == units and task.final_balance_deduction == units
    assert KlingTask.from_json(task_json("t-1", "succeed", "job-1")).final_unit_deduction is None


@pytest.mark.parametrize("obj", [
    None, [], "task", {},
    {"task_status": "submitted"},
    {"task_id": "", "task_status": "submitted"},
    {"task_id": 12, "task_status": "submitted"},
    {"task_id": "t"},
    {"task_id": "t", "task_status": "done"},
    {"task_id": "t", "task_status": "submitted", "task_info": "x"},
    {"task_id": "t", "task_status": "submitted", "task_info": {"external_task_id": 5}},
    {"task_id": "t", "task_status": "submitted", "created_at": "yesterday"},
    {"task_id": "t", "task_status": "submitted", "updated_at": True},
    {"task_id": "t", "task_status": "succeed", "task_result": {"videos": {"url": "u"}}},
    {"task_id": "t", "task_status": "succeed", "task_result": {"videos": [{"id": "v"}]}},
    {"task_id": "t", "task_status": "succeed", "task_result": {"videos": ["https://x/a.mp4"]}},
    {"task_id": "t", "task_status": "succeed", "task_result": {"videos": [{"url": "u", "id": ["x"]}]}},
])
def test_task_from_json_rejects_malformed_objects(obj: Any) -> None:
    with pytest.raises(ValueError):
        KlingTask.from_json(obj)


LONE = "\ud800"


def test_lone_surrogates_in_task_text_become_replacement_characters() -> None:
    """Issue 7 item 2: a lone UTF-16 surrogate in Kling's text could not be stored (UTF-8) and made a 500."""
    obj = json.loads(json.dumps(task_json("t-1", "failed", "job" + LONE, task_status_msg=f"bad {LONE} \udfff x",
                                          task_result={"videos": [{"id": "v" + LONE, "duration": "5" + LONE,
                                                                   "url": "https://cdn.example.com/a" + LONE}]})))
    task = KlingTask.from_json(obj)
    assert task.status_msg == "bad \ufffd \ufffd x" and task.external_task_id == "job\ufffd"
    assert task.videos == (KlingVideo("v\ufffd", "https://cdn.example.com/a\ufffd", "5\ufffd"),)
    video = task.videos[0]
    "".join([task.status_msg, task.external_task_id, video.id, video.url, video.duration]).encode()
    pair = KlingTask.from_json(json.loads('{"task_id": "t", "task_status": "failed", '
                                          '"task_status_msg": "\\ud83d\\ude00"}'))
    assert pair.status_msg == "\U0001f600"  # a valid surrogate pair is one character, kept


def test_a_task_id_with_a_lone_surrogate_is_malformed() -> None:
    with pytest.raises(ValueError, match="task_id"):
        KlingTask.from_json({"task_id": "t" + LONE, "task_status": "submitted"})


def test_lone_surrogates_in_an_error_envelope_are_replaced(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((400, envelope(1201, message=f"bad {LONE}", request_id="rq" + LONE)))
    with pytest.raises(KlingError) as info:
        make_client(scripted.url, api_key=API_KEY).get_task("t-1")
    assert (info.value.message, info.value.request_id) == ("bad \ufffd", "rq\ufffd")
    str(info.value).encode()


# --------------------------------------------------------------- transport against a scripted server

DROP = "drop"  # read the request, then close the connection without answering
HANG = "hang"  # read the request, then answer nothing until the test ends


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: bytes


@dataclass
class ScriptedKling:
    """A real HTTP server on 127.0.0.1 that answers from a script: (status, body), DROP, HANG, or a
    function of the request (Seen) returning (status, body)."""

    port: int
    replies: list[Any] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, *replies: Any) -> None:
        self.replies.extend(replies)


def _handler(script: ScriptedKling) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.seen.append(Seen(self.command, self.path, self.headers.get("Authorization"), body))
            reply = script.replies.pop(0) if script.replies else (500, b"no reply scripted")
            if callable(reply):
                reply = reply(script.seen[-1])
            if reply == HANG:
                script.release.wait(30)
                reply = DROP
            if reply == DROP:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status, payload = reply
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture()
def scripted() -> Iterator[ScriptedKling]:
    script = ScriptedKling(port=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    script.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield script
    script.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture()
def clients() -> Iterator[list[KlingClient]]:
    """Collects clients made in a test and closes them afterwards."""
    made: list[KlingClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture()
def make_client(clients: list[KlingClient]) -> Any:
    def make(base_url: str, **kwargs: Any) -> KlingClient:
        if "api_key" not in kwargs:
            kwargs.setdefault("access_key", AK)
            kwargs.setdefault("secret_key", SK)
        client = KlingClient(base_url, **kwargs)
        clients.append(client)
        return client
    return make


BODY = {"model_name": "kling-v1-6", "prompt": "a cat", "image_list": [{"image": "https://x/a.png"}],
        "external_task_id": "job-1"}


def test_calls_use_the_documented_paths_and_auth(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((200, envelope(data=task_json())), (200, envelope(data=task_json())),
                   (200, envelope(data=[task_json(), task_json("t-2", external_task_id=None)])))
    client = make_client(scripted.url + "/kling/", clock=FakeClock(T0))
    assert client.create_multi_image2video(BODY) == KlingTask.from_json(task_json())
    assert client.get_task("t 1/x").task_id == "t-1"
    assert [t.task_id for t in client.list_tasks(page_num=2, page_size=7)] == ["t-1", "t-2"]
    assert [(s.method, s.path) for s in scripted.seen] == [
        ("POST", "/kling/v1/videos/multi-image2video"),
        ("GET", "/kling/v1/videos/multi-image2video/t%201%2Fx"),
        ("GET", "/kling/v1/videos/multi-image2video?pageNum=2&pageSize=7"),
    ]
    assert json.loads(scripted.seen[0].body) == BODY
    tokens = {s.authorization for s in scripted.seen}
    assert len(tokens) == 1  # one cached token for all three calls
    (header,) = tokens
    assert header is not None and header.startswith("Bearer ")
    assert decode(header.removeprefix("Bearer "))["iss"] == AK


def test_api_key_mode_sends_the_key(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((200, envelope(data=task_json())))
    make_client(scripted.url, api_key=API_KEY).get_task("t-1")
    assert scripted.seen[0].authorization == f"Bearer {API_KEY}"


@pytest.mark.parametrize(("page_num", "page_size"), [(0, 30), (1001, 30), (1, 0), (1, 501)])
def test_list_tasks_checks_page_bounds(page_num: int, page_size: int, make_client: Any) -> None:
    with pytest.raises(ValueError):
        make_client("http://127.0.0.1:9", api_key=API_KEY).list_tasks(page_num, page_size)


def test_code_zero_is_success_whatever_the_status(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((202, envelope(data=task_json("t-5"))))
    assert make_client(scripted.url).get_task("t-5").task_id == "t-5"


@pytest.mark.parametrize(("status", "code", "kind"), DOCUMENTED_CODES + [(200, 1201, ErrorKind.FIX_REQUEST)])
def test_get_maps_every_code_over_http(scripted: ScriptedKling, make_client: Any, status: int, code: int,
                                       kind: ErrorKind) -> None:
    scripted.reply(*[(status, envelope(code, message=f"error {code}", request_id="rq-77"))] * 2)
    client = make_client(scripted.url, api_key=API_KEY)
    with pytest.raises(KlingError) as info:
        client.get_task("t-1")
    err = info.value
    assert type(err) is KIND_CLASSES[kind]
    assert (err.http_status, err.code, err.message, err.request_id) == (status, code, f"error {code}", "rq-77")
    assert len(scripted.seen) == 1  # API-key mode never retries, 1004 included
    assert API_KEY not in str(err)


@pytest.mark.parametrize(("status", "code", "kind"), [
    (429, 1302, ErrorKind.RETRY_LATER), (429, 1303, ErrorKind.RETRY_LATER), (400, 1201, ErrorKind.FIX_REQUEST),
    (429, 1101, ErrorKind.FIX_ACCOUNT), (500, 5000, ErrorKind.AMBIGUOUS), (503, 5001, ErrorKind.AMBIGUOUS),
    (504, 5002, ErrorKind.AMBIGUOUS), (502, 1999, ErrorKind.AMBIGUOUS), (400, 1999, ErrorKind.FIX_REQUEST),
])
def test_create_maps_codes_server_errors_are_ambiguous(scripted: ScriptedKling, make_client: Any, status: int,
                                                       code: int, kind: ErrorKind) -> None:
    scripted.reply((status, envelope(code, message="nope", request_id="rq-1")))
    with pytest.raises(KlingError) as info:
        make_client(scripted.url).create_multi_image2video(BODY)
    err = info.value
    assert err.kind is kind and (err.http_status, err.code, err.request_id) == (status, code, "rq-1")
    if kind is ErrorKind.AMBIGUOUS:
        assert isinstance(err.cause, KlingRetryLater) and err.cause.code == code


@pytest.mark.parametrize(("status", "body", "create", "kind"), [
    (502, b"<html>bad gateway</html>", False, ErrorKind.RETRY_LATER),
    (502, b"<html>bad gateway</html>", True, ErrorKind.AMBIGUOUS),
    (404, b"<html>not found</html>", False, ErrorKind.PROTOCOL),
    (404, b"<html>not found</html>", True, ErrorKind.PROTOCOL),
    (200, b'{"code": "0"}', False, ErrorKind.PROTOCOL),
    (200, b"[1, 2]", False, ErrorKind.PROTOCOL),
    (200, b"", True, ErrorKind.AMBIGUOUS),
    (200, envelope(data={"task_id": "t"}), False, ErrorKind.PROTOCOL),
    (200, envelope(data={"task_id": "t"}), True, ErrorKind.AMBIGUOUS),
    (200, envelope(data=None), True, ErrorKind.AMBIGUOUS),
    (200, b"[" * 200_000, False, ErrorKind.PROTOCOL),
    (200, envelope(data={**task_json(), "created_at": 1e400}).replace(b"1e400", b"Infinity"), False,
     ErrorKind.PROTOCOL),
])
def test_malformed_answers(scripted: ScriptedKling, make_client: Any, status: int, body: bytes, create: bool,
                           kind: ErrorKind) -> None:
    scripted.reply((status, body))
    client = make_client(scripted.url)
    with pytest.raises(KlingError) as info:
        client.create_multi_image2video(BODY) if create else client.get_task("t-1")
    assert info.value.kind is kind
    assert info.value.http_status == status


def test_malformed_list(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((200, envelope(data={"tasks": []})), (200, envelope(data=[task_json(), {"task_id": 3}])),
                   (200, envelope(data=None)))
    client = make_client(scripted.url)
    for _ in range(2):
        with pytest.raises(KlingProtocolError):
            client.list_tasks()
    assert client.list_tasks() == []


def test_expired_token_is_renewed_and_retried_once(scripted: ScriptedKling, make_client: Any) -> None:
    clock = FakeClock(T0)
    client = make_client(scripted.url, clock=clock)
    scripted.reply((200, envelope(data=task_json())))
    client.get_task("t-1")
    clock.now += 60  # the cache would keep the token; Kling says it expired (e.g. clock skew)
    scripted.reply((401, envelope(1004, message="token expired")), (200, envelope(data=task_json())))
    assert client.create_multi_image2video(BODY).task_id == "t-1"
    first, rejected, retried = (s.authorization or "" for s in scripted.seen)
    assert rejected == first and retried != first
    assert decode(retried.removeprefix("Bearer "))["exp"] == int(T0) + 60 + 1800
    assert scripted.seen[2].body == scripted.seen[1].body


def test_token_near_expiry_is_renewed_before_the_server_rejects_it(scripted: ScriptedKling,
                                                                     make_client: Any) -> None:
    clock = FakeClock(T0)  # shared by the client and the server's expiry check

    def checks_exp(seen: Seen) -> tuple[int, bytes]:
        claims = decode((seen.authorization or "").removeprefix("Bearer "))
        if claims["exp"] <= clock.now:
            return 401, envelope(1004, message="token expired")
        return 200, envelope(data=task_json())

    client = make_client(scripted.url, clock=clock)
    scripted.reply(*[checks_exp] * 4)
    client.get_task("t-1")
    clock.now += 1400  # 400 s left: reused
    client.get_task("t-1")
    clock.now += 200  # 200 s left: renewed before sending
    client.get_task("t-1")
    clock.now += 300  # the first token would have expired by now
    client.get_task("t-1")
    tokens = [s.authorization for s in scripted.seen]
    assert len(scripted.seen) == 4  # no 1004, no retry
    assert tokens[0] == tokens[1] != tokens[2] == tokens[3]


def test_expired_token_twice_is_an_account_error(scripted: ScriptedKling, make_client: Any) -> None:
    clock = FakeClock(T0)
    client = make_client(scripted.url, clock=clock)
    scripted.reply(*[(401, envelope(1004, message="token expired"))] * 3)
    with pytest.raises(KlingFixAccount) as info:
        client.get_task("t-1")
    assert info.value.code == 1004
    assert len(scripted.seen) == 2


def test_other_auth_errors_are_not_retried(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply(*[(401, envelope(1002, message="token invalid"))] * 2)
    with pytest.raises(KlingFixAccount):
        make_client(scripted.url).get_task("t-1")
    assert len(scripted.seen) == 1


def test_secrets_are_scrubbed_from_error_messages(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((400, envelope(1201, message=f"bad header Bearer {API_KEY}")),
                   (500, f"echo: Authorization: Bearer {API_KEY}".encode()))
    client = make_client(scripted.url, api_key=API_KEY)
    for _ in range(2):
        with pytest.raises(KlingError) as info:
            client.get_task("t-1")
        assert API_KEY not in str(info.value) and "<redacted>" in str(info.value)


def test_an_echoed_callback_url_is_scrubbed(scripted: ScriptedKling, make_client: Any) -> None:
    callback = "https://relay.example.com/callbacks/kling/job-1?token=cafe0123456789cafe"
    scripted.reply((400, envelope(1201, message=f"callback_url {callback} unreachable (token=cafe0123456789cafe)")))
    client = make_client(scripted.url, api_key=API_KEY)
    with pytest.raises(KlingError) as info:
        client.create_multi_image2video({**BODY, "callback_url": callback})
    assert "cafe0123456789cafe" not in str(info.value) and "<redacted>" in str(info.value)


def test_connection_refused_is_retry_later_even_on_create(make_client: Any) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(KlingRetryLater) as info:
        client.create_multi_image2video(BODY)
    assert info.value.http_status is None and isinstance(info.value.cause, requests.ConnectionError)
    with pytest.raises(KlingRetryLater):
        client.get_task("t-1")


def test_connection_dropped_after_sending(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply(DROP, DROP)
    client = make_client(scripted.url)
    with pytest.raises(KlingAmbiguous) as info:
        client.create_multi_image2video(BODY)
    assert isinstance(info.value.cause, requests.ConnectionError)
    with pytest.raises(KlingRetryLater):
        client.get_task("t-1")
    assert [s.method for s in scripted.seen] == ["POST", "GET"]  # the create did reach the server


def test_read_timeout(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply(HANG, HANG)
    client = make_client(scripted.url, timeout=(2.0, 0.3))
    with pytest.raises(KlingAmbiguous) as info:
        client.create_multi_image2video(BODY)
    assert isinstance(info.value.cause, requests.Timeout)
    with pytest.raises(KlingRetryLater) as retry:
        client.get_task("t-1")
    assert retry.value.retryable


def test_connect_timeout_on_create_is_retry_later(make_client: Any) -> None:
    # A listening socket whose accept backlog is full: further connects hang in SYN, never sent.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            client = make_client(f"http://127.0.0.1:{port}", timeout=(0.3, 5.0))
            with pytest.raises(KlingRetryLater) as info:
                client.create_multi_image2video(BODY)
        finally:
            for s in fillers:
                s.close()
    assert isinstance(info.value.cause, requests.ConnectTimeout)


def test_lookup_by_external_id_direct(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((200, envelope(data=task_json("t-7", external_task_id="job-7"))))
    assert make_client(scripted.url).get_task_by_external_id("job-7").task_id == "t-7"
    assert [s.path for s in scripted.seen] == ["/v1/videos/multi-image2video/job-7"]


@pytest.mark.parametrize("direct", [
    (404, envelope(1203, message="not found")),
    (400, envelope(1201, message="bad id")),
    (200, envelope(data=task_json("job-7", external_task_id="other"))),  # an id that is another task's task_id
    (404, envelope(1202, message="invalid request method")),
    (404, b"<html>404 page not found</html>"),  # a gateway's own page, not a Kling envelope
])
def test_lookup_by_external_id_falls_back_to_the_list(scripted: ScriptedKling, make_client: Any,
                                                      direct: Any) -> None:
    full_page = [task_json(f"t-{i}", external_task_id=f"job-{1000 + i}") for i in range(500)]
    scripted.reply(direct, (200, envelope(data=full_page)),
                   (200, envelope(data=[task_json("t-x", external_task_id=None),
                                        task_json("t-7", external_task_id="job-7")])))
    assert make_client(scripted.url).get_task_by_external_id("job-7").task_id == "t-7"
    assert [s.path for s in scripted.seen] == [
        "/v1/videos/multi-image2video/job-7",
        "/v1/videos/multi-image2video?pageNum=1&pageSize=500",
        "/v1/videos/multi-image2video?pageNum=2&pageSize=500",
    ]


def test_lookup_by_external_id_not_found_only_after_the_whole_list(scripted: ScriptedKling, make_client: Any) -> None:
    full_page = [task_json(f"t-{i}", external_task_id=f"job-{1000 + i}") for i in range(500)]
    scripted.reply((404, envelope(1203)), *[(200, envelope(data=full_page))] * 2,
                   (200, envelope(data=full_page[:3])))
    with pytest.raises(KlingTaskNotFound) as info:
        make_client(scripted.url).get_task_by_external_id("job-7")
    assert "1003 tasks" in info.value.message
    assert len(scripted.seen) == 4  # a short page is the last one
    scripted.seen.clear()
    scripted.reply((404, envelope(1203)), (200, envelope(data=[])))
    with pytest.raises(KlingTaskNotFound):
        make_client(scripted.url).get_task_by_external_id("job-7")
    assert len(scripted.seen) == 2


def test_lookup_that_hits_its_page_bound_is_never_not_found(scripted: ScriptedKling, make_client: Any) -> None:
    """Issue 9.2: the list's order is not documented, so a task may sit on any page. A lookup that stops at its
    bound before the list's end must not say "no task" (that would allow a second, billed create)."""
    full_page = [task_json(f"t-{i}", external_task_id=f"job-{1000 + i}") for i in range(500)]
    scripted.reply((404, envelope(1203)), *[(200, envelope(data=full_page))] * 2)
    with pytest.raises(KlingLookupIncomplete) as info:
        make_client(scripted.url).get_task_by_external_id("job-7", max_pages=2)
    assert not isinstance(info.value, KlingTaskNotFound) and info.value.kind is ErrorKind.RETRY_LATER
    assert "2 full pages" in info.value.message and "may exist" in info.value.message
    assert len(scripted.seen) == 3  # stopped after max_pages
    scripted.seen.clear()
    scripted.reply((404, envelope(1203)), *[(200, envelope(data=full_page))] * 3)
    with pytest.raises(KlingLookupIncomplete):
        make_client(scripted.url, lookup_max_pages=3).get_task_by_external_id("job-7")  # the client's own bound
    assert len(scripted.seen) == 4


@pytest.mark.parametrize("pages", [0, 1001, True, 2.0])
def test_lookup_bound_is_within_klings_page_limit(pages: Any, make_client: Any) -> None:
    with pytest.raises(ValueError, match="max_pages"):
        make_client("http://127.0.0.1:9", api_key=API_KEY, lookup_max_pages=pages)


def test_lookup_by_external_id_propagates_other_errors(scripted: ScriptedKling, make_client: Any) -> None:
    scripted.reply((429, envelope(1302)), (404, envelope(1203)), (503, envelope(5001)))
    client = make_client(scripted.url)
    with pytest.raises(KlingRetryLater):
        client.get_task_by_external_id("job-7")
    with pytest.raises(KlingRetryLater):
        client.get_task_by_external_id("job-7")
    assert len(scripted.seen) == 3


# ------------------------------------------------------------------------------- against the simulator

IMAGE = {"image": "https://example.com/still.png"}  # only fetched once a task is processing


def sim_body(external_task_id: str) -> dict[str, Any]:
    return {"model_name": "kling-v1-6", "prompt": "a lighthouse at dusk", "image_list": [IMAGE],
            "duration": "5", "external_task_id": external_task_id}


@pytest.fixture(scope="module")
def jwt_sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    # tasks stay "submitted": these tests are about the API, not about generating videos
    with running_simulator(tmp_path_factory.mktemp("sim"), "--submitted-seconds", "600",
                           prefix="/kling") as handle:
        yield handle


@pytest.fixture()
def sim(jwt_sim_process: SimHandle) -> SimHandle:
    """The module's JWT-mode simulator behind a /kling prefix, with no tasks and the startup knobs."""
    jwt_sim_process.reset()
    return jwt_sim_process


@pytest.fixture()
def sim_client(sim: SimHandle, make_client: Any) -> KlingClient:
    client: KlingClient = make_client(sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key)
    return client


def test_sim_create_get_list_and_lookup_behind_a_prefix(sim: SimHandle, sim_client: KlingClient) -> None:
    a, b, c = (sim_client.create_multi_image2video(sim_body(f"job-{x}")) for x in "abc")
    assert (a.status, a.external_task_id) == ("submitted", "job-a")
    assert sim_client.get_task(b.task_id) == b
    assert sim_client.get_task_by_external_id("job-b") == b
    assert sim_client.list_tasks(page_size=2) == [c, b]
    assert sim_client.list_tasks(page_num=2, page_size=2) == [a]
    stats = sim.stats()
    assert stats["tasks_by_external_id"] == {"job-a": [a.task_id], "job-b": [b.task_id], "job-c": [c.task_id]}
    assert stats["requests"] == {"POST /v1/videos/multi-image2video": 3,
                                 "GET /v1/videos/multi-image2video/{id}": 2,  # the lookup needed no list scan
                                 "GET /v1/videos/multi-image2video": 2}


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_sim_lookup_reads_every_page_whatever_the_list_order(sim: SimHandle, sim_client: KlingClient,
                                                             order: str) -> None:
    """Issue 9.2: Kling does not say the list is newest first. With the path slot taking task ids only (the other
    reading of the docs), the lookup finds a task on any page, and a bound reached is not "not found"."""
    sim.control(path_external_id=False, list_order=order)
    sim_client.create_multi_image2video(sim_body("job-0"))
    with ThreadPoolExecutor(8) as pool:  # the order among these does not matter: only the first and last count
        list(pool.map(lambda n: sim_client.create_multi_image2video(sim_body(f"job-{n}")), range(1, 500)))
    sim_client.create_multi_image2video(sim_body("job-500"))
    last_page = "job-500" if order == "oldest" else "job-0"  # the one task on page 2
    assert sim_client.get_task_by_external_id(last_page).external_task_id == last_page
    with pytest.raises(KlingLookupIncomplete):
        sim_client.get_task_by_external_id(last_page, max_pages=1)
    with pytest.raises(KlingTaskNotFound):
        sim_client.get_task_by_external_id("job-none")
    assert sim.stats()["requests"]["GET /v1/videos/multi-image2video"] == 2 + 1 + 2


def test_sim_api_key_mode(log_dir: Path, make_client: Any) -> None:
    with running_simulator(log_dir, "--submitted-seconds", "600", api_key=API_KEY) as sim:
        task = make_client(sim.base_url, api_key=API_KEY).create_multi_image2video(sim_body("job-k"))
        assert make_client(sim.base_url, api_key=API_KEY).get_task_by_external_id("job-k") == task
        with pytest.raises(KlingFixAccount) as info:
            make_client(sim.base_url, api_key="not-the-key").get_task(task.task_id)
        assert (info.value.http_status, info.value.code) == (401, 1002)
        assert "not-the-key" not in str(info.value)


def test_sim_wrong_secret_is_an_account_error(sim: SimHandle, make_client: Any) -> None:
    client = make_client(sim.base_url, access_key=sim.access_key, secret_key="x" * 40)
    with pytest.raises(KlingFixAccount) as info:
        client.create_multi_image2video(sim_body("job-1"))
    assert (info.value.http_status, info.value.code) == (401, 1002)
    assert sim.stats()["requests"] == {"POST /v1/videos/multi-image2video": 1}  # not retried


def test_sim_unknown_task(sim: SimHandle, sim_client: KlingClient) -> None:
    sim_client.create_multi_image2video(sim_body("job-1"))
    with pytest.raises(KlingTaskNotFound) as info:
        sim_client.get_task("no-such-task")
    assert (info.value.http_status, info.value.code, info.value.kind) == (404, 1203, ErrorKind.NOT_FOUND)
    with pytest.raises(KlingTaskNotFound):
        sim_client.get_task_by_external_id("job-2")
    assert sim.stats()["requests"]["GET /v1/videos/multi-image2video"] == 1  # direct miss, then one short page


def test_sim_duplicate_external_id(sim: SimHandle, sim_client: KlingClient) -> None:
    sim_client.create_multi_image2video(sim_body("job-1"))
    with pytest.raises(KlingFixRequest) as info:
        sim_client.create_multi_image2video(sim_body("job-1"))
    assert (info.value.http_status, info.value.code, info.value.kind) == (400, 1201, ErrorKind.FIX_REQUEST)
    assert "external_task_id" in info.value.message
    assert sim.stats()["tasks_created"] == 1


def test_sim_invalid_body_is_a_request_error(sim_client: KlingClient) -> None:
    with pytest.raises(KlingFixRequest) as info:
        sim_client.create_multi_image2video({**sim_body("job-1"), "image_list": []})
    assert info.value.code == 1201 and not info.value.retryable


def test_sim_rate_limit_and_concurrency_cap(sim: SimHandle, sim_client: KlingClient) -> None:
    sim.control(rate_limit_every_n=1)
    with pytest.raises(KlingRetryLater) as info:
        sim_client.create_multi_image2video(sim_body("job-1"))
    assert (info.value.http_status, info.value.code) == (429, 1302) and info.value.retryable
    sim.control(rate_limit_every_n=0, max_in_flight=1)
    sim_client.create_multi_image2video(sim_body("job-1"))
    with pytest.raises(KlingRetryLater) as info:
        sim_client.create_multi_image2video(sim_body("job-2"))
    assert (info.value.http_status, info.value.code) == (429, 1303)
    assert sim.stats()["tasks_created"] == 1


@pytest.mark.parametrize(("code", "status"), [(5000, 500), (5001, 503), (5002, 504)])
def test_sim_server_errors(sim: SimHandle, sim_client: KlingClient, code: int, status: int) -> None:
    sim.control(server_error_every_n=1, server_error_code=code, server_error_on="all")
    with pytest.raises(KlingRetryLater) as retry:
        sim_client.get_task("any")
    assert (retry.value.http_status, retry.value.code) == (status, code)
    with pytest.raises(KlingAmbiguous) as ambiguous:
        sim_client.create_multi_image2video(sim_body("job-1"))
    assert (ambiguous.value.http_status, ambiguous.value.code) == (status, code)
    assert isinstance(ambiguous.value.cause, KlingRetryLater) and not ambiguous.value.retryable


def test_sim_server_error_after_create_task_exists(sim: SimHandle, sim_client: KlingClient) -> None:
    sim.control(server_error_every_n=1, server_error_creates_task=True)
    with pytest.raises(KlingAmbiguous):
        sim_client.create_multi_image2video(sim_body("job-1"))
    found = sim_client.get_task_by_external_id("job-1")
    assert sim.stats()["tasks_by_external_id"] == {"job-1": [found.task_id]}


@pytest.mark.parametrize(("status", "code", "kind"), DOCUMENTED_CODES)
def test_sim_every_code_on_create_and_query(sim: SimHandle, sim_client: KlingClient, status: int, code: int,
                                            kind: ErrorKind) -> None:
    sim.control(force_error_code=code, force_error_on="all")
    with pytest.raises(KlingError) as on_query:
        sim_client.get_task("any")
    assert (on_query.value.kind, on_query.value.http_status, on_query.value.code) == (kind, status, code)
    with pytest.raises(KlingError) as on_create:
        sim_client.create_multi_image2video(sim_body("job-1"))
    create_kind = ErrorKind.AMBIGUOUS if code >= 5000 else kind
    assert (on_create.value.kind, on_create.value.http_status, on_create.value.code) == (create_kind, status,
                                                                                         code)
    assert type(on_create.value) is KIND_CLASSES[create_kind]
    tries = 2 if code == 1004 else 1  # a 1004 is retried once with a fresh token, then given up
    assert sim.stats()["error_codes"] == {str(code): 2 * tries}


def test_sim_ambiguous_create_dropped_connection(sim: SimHandle, sim_client: KlingClient) -> None:
    sim.control(ambiguous_create_every_n=1, ambiguous_create_mode="drop")
    with pytest.raises(KlingAmbiguous) as info:
        sim_client.create_multi_image2video(sim_body("job-1"))
    assert isinstance(info.value.cause, requests.ConnectionError) and info.value.http_status is None
    task = sim_client.get_task_by_external_id("job-1")
    assert sim.stats()["tasks_by_external_id"] == {"job-1": [task.task_id]}


def test_sim_ambiguous_create_late_answer(sim: SimHandle, make_client: Any) -> None:
    sim.control(ambiguous_create_every_n=1, ambiguous_create_mode="delay", ambiguous_create_delay=3)
    client = make_client(sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key,
                         timeout=(2.0, 0.3))
    with pytest.raises(KlingAmbiguous) as info:
        client.create_multi_image2video(sim_body("job-1"))
    assert isinstance(info.value.cause, requests.Timeout)
    assert client.get_task_by_external_id("job-1").external_task_id == "job-1"


def test_sim_connection_refused_is_retry_later(log_dir: Path, make_client: Any) -> None:
    sim = start_simulator(log_dir, prefix="/kling")
    sim.stop()
    client = make_client(sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key)
    with pytest.raises(KlingRetryLater) as info:
        client.create_multi_image2video(sim_body("job-1"))
    assert info.value.http_status is None and info.value.retryable


def test_sim_expired_token_triggers_one_renewal(sim: SimHandle, make_client: Any) -> None:
    readings: list[float] = []

    def clock() -> float:
        # the first reading is half an hour late, so the first token has expired; later readings are right
        readings.append(time.time() - (2000 if not readings else 0))
        return readings[-1]

    client = make_client(sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key, clock=clock)
    task = client.create_multi_image2video(sim_body("job-1"))
    stats = sim.stats()
    assert stats["error_codes"] == {"1004": 1}
    assert stats["requests"] == {"POST /v1/videos/multi-image2video": 2}
    assert stats["tasks_by_external_id"] == {"job-1": [task.task_id]}


def test_sim_token_near_expiry_is_renewed_before_sending(sim: SimHandle, make_client: Any) -> None:
    clock = SkewedClock(-1803.0)  # the first tokens' exp is 3-4 s ago: still inside the simulator's 5 s leeway
    keys = {"access_key": sim.access_key, "secret_key": sim.secret_key, "clock": clock}
    client = make_client(sim.base_url, **keys)
    control = make_client(sim.base_url, **keys, jwt_renew_margin=0)  # the same client without the margin
    client.create_multi_image2video(sim_body("job-1"))
    control.get_task_by_external_id("job-1")
    # deliberate: the simulator checks exp on the real clock; after this its leeway has passed for those tokens
    time.sleep(2.1)
    clock.offset += 1700  # the clients' clock sees ~100 s left on them: less than the 300 s margin
    assert client.get_task_by_external_id("job-1").external_task_id == "job-1"
    assert sim.stats()["error_codes"] == {}  # renewed before sending, never refused
    assert control.get_task_by_external_id("job-1").external_task_id == "job-1"
    assert sim.stats()["error_codes"] == {"1004": 1}  # the control sent its stale token and was refused
