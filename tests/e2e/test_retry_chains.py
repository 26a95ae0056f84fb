"""Long retry chains end only on the relay's own budgets (issue 7, item 1), with the reconciler switched off.

Celery's `task.retry(max_retries=None)` means "the task's default", 3: a fourth retry raised
MaxRetriesExceededError, the job dropped out of its back-off and waited for the reconciler. Here the stack runs
without beat, so no reconcile pass can rescue anything: each job must get through six retryable failures in a
row on the back-off alone (submit throttled with 1302, S3 refusing the copy, the receiver answering 503).
Back-offs are short (0.2 s up to 1 s) and the budgets large enough (10 submit / copy attempts, notify: 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from deploy.stack import BUCKET, DEMO_NOTIFY_SECRET, LocalStack
from kling_relay.shared.jobs import JobStore
from kling_relay.shared.notify import verify
from kling_relay.shared.settings import Secret
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import FAST_SIM_ARGS, assert_stored_once, get_job, retry_notes, wait_until
from tests.support.faulty_proxy import FaultyProxy
from tests.support.receiver import Receiver, serve_receiver

pytestmark = pytest.mark.e2e

FAILURES = 6  # retryable failures in a row: two more than Celery's default limit let through
ENV = {
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_SECONDS": "1",
    "SUBMIT_MAX_ATTEMPTS": "10",
    "COPY_MAX_ATTEMPTS": "10",
    "MAX_REQUEST_BYTES": "2000000",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, FaultyProxy]]:
    """A stack without beat (no reconciler) whose relay processes reach S3 through a FaultyProxy."""
    stack = LocalStack(tmp_path_factory.mktemp("retry-chains"), sim_args=FAST_SIM_ARGS, env=ENV,
                       bucket_versioning=True)
    proxy = FaultyProxy(stack.s3_endpoint).start()
    try:
        stack.route_s3_through(proxy.url)
        stack.start(workers=1, beat=False)
        try:
            yield stack, proxy
        finally:
            stack.stop()
    finally:
        proxy.stop()


@pytest.fixture()
def stack(proxied: tuple[LocalStack, FaultyProxy]) -> LocalStack:
    stack, proxy = proxied
    proxy.heal()
    stack.sim_reset()
    return stack


@pytest.fixture()
def proxy(proxied: tuple[LocalStack, FaultyProxy]) -> Iterator[FaultyProxy]:
    yield proxied[1]
    proxied[1].heal()


def puts_the_video(method: str, path: str) -> bool:
    """Matcher for the PutObject of a video (`PUT /<bucket>/<key>/video.mp4`, no query): a short video's upload."""
    key, _, query = path.partition("?")
    return method == "PUT" and not query and key.endswith("/video.mp4")


def only_the_back_off(stack: LocalStack, job: dict[str, Any]) -> None:
    """No reconcile pass touched the job (no beat runs) and no retry chain hit a Celery limit."""
    assert "beat" not in stack.processes
    sources = {e["source"] for e in job["events"]}
    assert "reconciler" not in sources, sources
    log = stack.processes["worker1"].log_path.read_text(errors="replace")
    assert "MaxRetriesExceededError" not in log, stack.logs_tail()


def test_submit_throttled_six_times_in_a_row_is_stored(stack: LocalStack) -> None:
    """1302 on the first six creates: each throttle backs off (no attempt spent) and the seventh create lands.

    Before the fix the fourth retry raised MaxRetriesExceededError after four 1302s and the job stayed queued.
    """
    stack.sim_control(rate_limit_first_n=FAILURES)
    job_id = submit(stack, job_body(7001))
    job = wait_jobs(stack, [job_id], timeout=120)[job_id]
    assert job["state"] == "stored", (job["state"], job["error"])
    assert stack.sim_stats()["error_codes"].get("1302") == FAILURES
    throttled = [e for e in job["events"] if "throttled" in e["detail"]]
    assert len(throttled) == FAILURES, throttled
    only_the_back_off(stack, job)
    assert_stored_once(stack, {job_id: job})


def test_copy_refused_by_s3_six_times_in_a_row_is_stored(stack: LocalStack, proxy: FaultyProxy) -> None:
    """S3 answers 500 InternalError to every PutObject of the video (a short video goes up in one): six copy
    attempts fail (each after boto3's own quick retries), then S3 heals and the seventh attempt stores the video.

    Before the fix the chain ended at the fourth copy attempt (MaxRetriesExceededError), the job stayed
    `generated` and the sixth failed attempt never came.
    """
    proxy.refuse("500", match=puts_the_video)
    job_id = submit(stack, job_body(7002))

    def six_failed_copies() -> list[dict[str, Any]] | None:
        notes = retry_notes(get_job(stack, job_id), "copy:")
        return notes if len(notes) >= FAILURES else None

    notes = wait_until(six_failed_copies, timeout=180, what=f"{FAILURES} failed copy attempts", stack=stack,
                       interval=0.5)
    refused = proxy.refused
    proxy.heal()
    job = wait_jobs(stack, [job_id], timeout=120)[job_id]
    assert job["state"] == "stored", (job["state"], job["error"])
    notes = retry_notes(job, "copy:")
    assert [n["detail"]["attempt"] for n in notes] == list(range(1, len(notes) + 1))
    assert len(notes) >= FAILURES
    assert refused >= FAILURES
    only_the_back_off(stack, job)
    assert_stored_once(stack, {job_id: job})
    assert not [u for u in stack.s3().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
                if job_id in u["Key"]]


@pytest.fixture()
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    with serve_receiver("/hooks/relay", fail_first=FAILURES) as served:
        yield served


def test_notify_answered_503_six_times_in_a_row_is_delivered(stack: LocalStack,
                                                              receiver: tuple[str, type[Receiver]]) -> None:
    """The receiver answers 503 six times, then 204: the seventh delivery lands (budget: 10 attempts).

    Before the fix the fourth retry raised MaxRetriesExceededError: four POSTs, no "delivered", no "gave up".
    """
    url, handler = receiver
    job_id = submit(stack, job_body(7003, notify_url=url))
    assert wait_jobs(stack, [job_id], timeout=120)[job_id]["state"] == "stored"

    def delivered() -> dict[str, Any] | None:
        job = get_job(stack, job_id)
        return job if any(e["detail"].get("notify") for e in job["events"]) else None

    job = wait_until(delivered, timeout=120, what="the notification's outcome", stack=stack, interval=0.3)
    outcomes = [e["detail"] for e in job["events"] if e["detail"].get("notify")]
    assert outcomes == [{"notify": "delivered", "state": "stored", "http_status": 204}], outcomes
    with handler.lock:
        seen = list(handler.seen)
    assert len(seen) == FAILURES + 1
    assert len({headers["webhook-id"] for headers, _ in seen}) == 1
    assert all(verify(Secret(DEMO_NOTIFY_SECRET), headers, body) for headers, body in seen)
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    try:
        assert JobStore(client).require(job_id).attempts.get("notify_stored") == FAILURES + 1  # no other try
    finally:
        client.close()
    only_the_back_off(stack, job)
