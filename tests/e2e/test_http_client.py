"""The HTTP client (`kling_relay.shared.http_client`) against the whole running stack: gunicorn, Celery, Redis,
moto S3 and the simulator, every part real. What a backend app sees: jobs submitted, waited for, listed, canceled
and refused, the API's errors as typed exceptions, and a signed notification checked with `verify`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from deploy.stack import DEMO_API_TOKEN, DEMO_NOTIFY_SECRET, LocalStack
from kling_relay.shared import flow
from kling_relay.shared.http_client import (
    Conflict,
    NotFound,
    RelayClient,
    Unauthorized,
    ValidationFailed,
    verify,
)
from tests.e2e.conftest import job_body
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture()
def client(clean_sim: LocalStack) -> Iterator[RelayClient]:
    with RelayClient.from_env({"KLING_RELAY_URL": clean_sim.web_url, "KLING_RELAY_TOKEN": DEMO_API_TOKEN}) as c:
        yield c


@pytest.fixture()
def paused(clean_sim: LocalStack) -> Iterator[redis.Redis]:
    """Submission paused (as after an account error at Kling): submitted jobs stay queued until resumed."""
    r = redis.Redis.from_url(clean_sim.env["REDIS_URL"], decode_responses=True)
    flow.pause(r, code=1101, message="account in arrears (test)")
    try:
        yield r
    finally:
        flow.resume(r, by="test")
        r.close()


def test_submit_wait_get_and_idempotent_replay(client: RelayClient) -> None:
    body = job_body(31)
    seen: list[str] = []
    job = client.submit(idempotency_key="http-client-31", metadata={"order": 31}, **body)
    assert job.state == "queued" and job.metadata == {"order": 31}
    assert client.submit(idempotency_key="http-client-31", metadata={"order": 31}, **body).id == job.id
    with pytest.raises(Conflict) as info:
        client.submit(idempotency_key="http-client-31", metadata={"order": 32}, **body)
    assert info.value.status == 409 and "Idempotency-Key" in info.value.message

    done = client.wait(job.id, timeout=120, poll=0.2, max_poll=1.0, on_change=lambda j: seen.append(j.state))
    assert done.state == "stored" and done.finished and seen[-1] == "stored"
    assert done.videos[0]["key"].endswith(f"/{job.id}/video.mp4") and done.videos[0]["bytes"] > 0
    got = client.get(job.id)
    assert got.state == "stored" and got.kling_task_id == done.kling_task_id and got.metadata == {"order": 31}
    assert got.events is not None and [e["to"] for e in got.events][-1] == "stored"
    assert got.created_at is not None and got.updated_at is not None and got.created_at <= got.updated_at

    with pytest.raises(Conflict) as refused:  # a stored job cannot be retried
        client.retry(job.id, reason="again")
    assert refused.value.state == "stored" and "only a failed job" in refused.value.message


def test_list_pages_through_every_job(client: RelayClient) -> None:
    ids = [client.submit(**job_body(40 + n)).id for n in range(3)]
    paged: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        jobs, cursor = client.list(limit=2, cursor=cursor)
        assert len(jobs) <= 2 and all(j.events is None for j in jobs)
        paged += [j.id for j in jobs]
        pages += 1
        if cursor is None:
            break
    assert len(paged) == len(set(paged)) and pages >= 2
    assert [i for i in paged if i in ids] == ids[::-1]  # newest first
    assert [j.id for j in client.iter_jobs(page_size=2)] == paged
    for job_id in ids:
        client.wait(job_id, timeout=120, poll=0.2)


def test_errors_carry_the_apis_answer(client: RelayClient, clean_sim: LocalStack) -> None:
    with pytest.raises(ValidationFailed) as info:
        client.submit(image_list=[], prompt="", mode="turbo", duration=7, aspect_ratio="4:3",
                      metadata={"n": 1}, notify_url="ftp://nope")
    fields = [p.field for p in info.value.problems]
    assert {"image_list", "prompt", "mode", "duration", "aspect_ratio", "notify_url"} <= set(fields)
    assert info.value.status == 422 and info.value.body["fields"] == [p.as_dict() for p in info.value.problems]
    with pytest.raises(ValidationFailed) as bad_limit:
        client.list(limit=0)
    assert [p.field for p in bad_limit.value.problems] == ["limit"]

    with pytest.raises(NotFound):
        client.get("job_unknown")
    with pytest.raises(NotFound):
        client.cancel("job_unknown")

    with RelayClient(clean_sim.web_url, "wrong-token-0123456789abcdef") as stranger, \
            pytest.raises(Unauthorized) as denied:
        stranger.status()
    assert denied.value.status == 401 and "wrong-token" not in str(denied.value)


def test_cancel_a_queued_job_while_submission_is_paused(client: RelayClient, paused: redis.Redis) -> None:
    status = client.status()
    assert status["submission"] == "paused" and status["pause"]["code"] == 1101
    job = client.submit(**job_body(50))
    canceled = client.cancel(job.id, reason="customer left")
    assert canceled.state == "canceled"
    # the last step (a note, from == to, may follow it: the worker's submit of this job may note "submission
    # paused" while the cancel lands; it changes nothing)
    steps = [e for e in canceled.events or [] if e["from"] != e["to"]]
    last = steps[-1] if steps else {}
    assert (last["from"], last["to"], last["source"]) == ("queued", "canceled", "api")
    assert last["detail"]["reason"] == "customer left"
    with pytest.raises(Conflict) as again:
        client.cancel(job.id)
    assert again.value.state == "canceled"
    with pytest.raises(Conflict):
        client.retry(job.id)

    resumed = client.resume_submission()
    assert resumed["resumed"] is True and resumed["pause"]["code"] == 1101
    assert client.status()["submission"] == "open"
    assert client.get(job.id).state == "canceled"


class _Hook(BaseHTTPRequestHandler):
    seen: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(({k: v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_notification_verified_with_the_plain_string_secret(client: RelayClient) -> None:
    handler = type("Hook", (_Hook,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/kling"
        job = client.submit(notify_url=url, **job_body(60))
        assert client.wait(job.id, timeout=120, poll=0.2).state == "stored"
        wait_until(lambda: handler.seen, timeout=30, what="the notification")
        [(headers, body)] = handler.seen
    finally:
        server.shutdown()
        server.server_close()
    assert verify(DEMO_NOTIFY_SECRET, headers, body)  # NOTIFY_SECRET as the operator set it, a plain string
    assert not verify("another-secret-0123456789", headers, body)
    assert not verify(DEMO_NOTIFY_SECRET, headers, body.replace(b"stored", b"failed"))
    assert json.loads(body)["data"]["id"] == job.id
