"""The reconciler and flow control end to end: beat, workers, web, the simulator and S3 as real processes.

The module's stack runs beat with a one-second reconcile interval, jobs count as quiet after two seconds and a
paused submission is probed every second. Each test turns one simulator fault on and checks that every job still
ends stored, with exactly one Kling task, through the path the fault forces.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from deploy.stack import LocalStack
from kling_relay.shared import flow
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

ENV = {
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_QUIET_SECONDS": "2",
    "KLING_PAUSE_PROBE_SECONDS": "1",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_SECONDS": "2",
    "MAX_REQUEST_BYTES": "2000000",
}


@pytest.fixture(scope="module")
def beat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("reconcile-stack"),
                       sim_args=["--submitted-seconds", "0.2", "--processing-seconds", "0.5"], env=ENV)
    stack.start(workers=1, beat=True)
    yield stack
    stack.stop()


@pytest.fixture()
def stack(beat_stack: LocalStack) -> Iterator[LocalStack]:
    beat_stack.sim_reset()
    yield beat_stack
    beat_stack.sim_reset()


@pytest.fixture()
def client(stack: LocalStack) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    yield c
    c.close()


def one_task_each(stack: LocalStack, ids: list[str]) -> None:
    stats = stack.sim_stats()
    assert {i: len(stats["tasks_by_external_id"].get(i, [])) for i in ids} == dict.fromkeys(ids, 1)
    assert not set(ids) & set(stats["duplicate_creates"])


def steps(job: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["to"], e["source"]) for e in job["events"] if e["from"] != e["to"]]


def test_all_callbacks_dropped_every_job_is_stored_through_the_reconciler(stack: LocalStack) -> None:
    stack.sim_control(callback_drop_every_n=1)
    ids = [submit(stack, job_body(200 + n)) for n in range(4)]
    jobs = wait_jobs(stack, ids, timeout=60)
    stats = stack.sim_stats()
    for job in jobs.values():
        assert job["state"] == "stored", job
        callbacks = stats["callbacks"][job["kling_task_id"]]
        assert callbacks and all(c.get("dropped") for c in callbacks)
        assert ("generated", "reconciler") in steps(job), steps(job)
        assert not [e for e in job["events"] if e["source"] == "callback"]
    one_task_each(stack, ids)


def test_account_error_pauses_then_the_probe_resumes_and_all_are_stored(stack: LocalStack,
                                                                          client: redis.Redis) -> None:
    stack.sim_control(force_error_code=1101)
    ids = [submit(stack, job_body(300 + n)) for n in range(3)]

    wait_until(lambda: flow.status(client)["submission"] == "paused", timeout=30, what="submission paused",
               diagnostics=stack.logs_tail)
    refused_at_pause = stack.sim_stats()["error_codes"].get("1101", 0)
    # a few reconcile passes and probes while the account error lasts: two more trial creates refused with 1101
    wait_until(lambda: stack.sim_stats()["error_codes"].get("1101", 0) >= refused_at_pause + 2, timeout=30,
               what="two trial creates refused while paused", diagnostics=stack.logs_tail)
    status = flow.status(client)
    assert status["submission"] == "paused", "a trial create failed again: still paused"
    assert status["pause"]["reason"] == "account" and status["pause"]["code"] == 1101
    jobs = {i: stack.api("GET", f"/v1/jobs/{i}").json() for i in ids}
    assert {j["state"] for j in jobs.values()} == {"queued"}, jobs
    assert all(j["error"] is None for j in jobs.values())
    stats = stack.sim_stats()
    assert stats["tasks_created"] == 0
    # each of the 3 submits may meet 1101 once before the pause is recorded; after that only trials (one per
    # probe interval, about one a second) reach Kling, not every queued job on every pass
    assert stats["error_codes"].get("1101", 0) <= 3 + 8, stats["error_codes"]

    stack.sim_control(force_error_code=0)
    jobs = wait_jobs(stack, ids, timeout=45)
    assert {j["state"] for j in jobs.values()} == {"stored"}, jobs
    assert flow.status(client)["submission"] == "open"
    one_task_each(stack, ids)


def test_1302_on_every_second_create_all_stored_one_task_each(stack: LocalStack) -> None:
    stack.sim_control(rate_limit_every_n=2)
    ids = [submit(stack, job_body(400 + n)) for n in range(6)]
    jobs = wait_jobs(stack, ids, timeout=60)
    assert {j["state"] for j in jobs.values()} == {"stored"}, jobs
    stats = stack.sim_stats()
    assert stats["error_codes"].get("1302", 0) >= 3, stats["error_codes"]
    one_task_each(stack, ids)
    throttled = [e for j in jobs.values() for e in j["events"] if "throttled" in e["detail"]]
    assert throttled, "some creates were answered 1302 and backed off"


def test_lost_submit_messages_are_sent_again_by_the_reconciler(stack: LocalStack, client: redis.Redis) -> None:
    stack.kill("worker1", signal.SIGTERM)
    try:
        ids = [submit(stack, job_body(500 + n)) for n in range(3)]
        assert client.llen("submit") >= 3
        client.delete("submit")  # the broker lost every submit message
    finally:
        stack.restart("worker1")
    jobs = wait_jobs(stack, ids, timeout=45)
    for job in jobs.values():
        assert job["state"] == "stored", job
        requeued = [e for e in job["events"] if e["detail"].get("requeued") == "submit"]
        assert requeued and requeued[0]["source"] == "reconciler"
    one_task_each(stack, ids)
