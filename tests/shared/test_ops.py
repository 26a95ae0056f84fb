"""Ops actions (shared/ops.py) on a real redis-server: which failures a retry resumes and how, cancel from every
live state, refusals that change nothing, races, and the retried submit looking Kling up before any create."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kling_relay.shared import pipeline
from kling_relay.shared.jobs import JobNotFound, JobState, JobStore, StepResult
from kling_relay.shared.kling import KlingClient
from kling_relay.shared.limits import REASON_MAX_CHARS as MAX_REASON_CHARS
from kling_relay.shared.notify import EventsStream
from kling_relay.shared.ops import ActionRefused, cancel_job, retry_job, retry_mode
from kling_relay.shared.queue import COPY_QUEUE, SUBMIT_QUEUE, Enqueuer, make_celery
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import load_settings
from kling_relay.shared.validation import ValidationFailed
from tests.support.images import image_b64
from tests.support.settings_env import relay_env
from tests.support.sim import running_simulator

REQUEST: dict[str, Any] = {"model_name": "kling-v1-6", "image_list": [{"image": "https://example.com/a.png"}],
                           "prompt": "a test", "mode": "std", "duration": "5", "aspect_ratio": "16:9"}


@pytest.fixture()
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


@pytest.fixture()
def enqueuer(redis_url: str) -> Iterator[Enqueuer]:
    app = make_celery(redis_url)
    yield Enqueuer(app)
    app.close()


def messages(client: redis.Redis, queue: str) -> list[list[Any]]:
    """The task arguments of every message waiting in a Celery queue (kombu's Redis list of that name)."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0] for raw in client.lrange(queue, 0, -1)]


STREAM = EventsStream("kling-relay:events", 1000)


def cancel(store: JobStore, enqueuer: Enqueuer, job_id: str, **kwargs: Any) -> StepResult:
    return cancel_job(store, enqueuer, job_id, stream=STREAM, **kwargs)


def failed_job(store: JobStore, reason: str, *, task_id: str | None = None, via: list[JobState] | None = None,
               deadline_seconds: float | None = None) -> str:
    job, _ = store.create(dict(REQUEST), deadline_seconds=deadline_seconds)
    if task_id:
        store.step(job.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": task_id})
    for state in via or []:
        store.step(job.id, state, source="callback")
    store.bump_attempt(job.id, "copy" if reason == "copy_exhausted" else "submit")
    error = {"reason": reason, "code": None, "message": "it broke"}
    assert store.step(job.id, JobState.FAILED, source="worker", set_fields={"error": error}, due_in=None).applied
    return job.id


def test_retry_after_copy_exhausted_goes_back_to_generated_and_queues_the_copy(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis) -> None:
    job_id = failed_job(store, "copy_exhausted", task_id="task-1", via=[JobState.PROCESSING, JobState.GENERATED])
    result = retry_job(store, enqueuer, job_id, detail={"via": "test", "reason": "S3 is back"}, due_in=60)
    assert result.applied and result.from_state is JobState.FAILED
    job = store.require(job_id)
    assert job.state is JobState.GENERATED and job.kling_task_id == "task-1" and job.error is None
    assert job.attempts == {"create_sent": 1}  # copy budget fresh; a stray submit would look up first
    assert messages(redis_client, COPY_QUEUE) == [[job_id]] and messages(redis_client, SUBMIT_QUEUE) == []
    events = store.events(job_id)
    assert [(e.from_state, e.to_state, e.source) for e in events[-2:]] == [
        ("failed", "queued", "api"), ("queued", "generated", "api")]
    assert events[-2].detail["previous_error"]["reason"] == "copy_exhausted"
    assert events[-1].detail == {"action": "retry", "mode": "copy", "via": "test", "reason": "S3 is back"}
    assert job_id in store.due(now=job.updated_at + 61)


@pytest.mark.parametrize("reason", ["submit_exhausted", "auth", "account", "invalid", "kling_rejected:1301"])
def test_retry_of_a_submit_side_failure_requeues_the_submit_with_a_lookup_first(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis, reason: str) -> None:
    job_id = failed_job(store, reason)
    result = retry_job(store, enqueuer, job_id, detail={"via": "test"})
    job = result.job
    assert job.state is JobState.QUEUED and job.error is None and job.kling_task_id is None
    assert job.attempts == {"create_sent": 1}  # the next submit looks up by external_task_id first
    assert messages(redis_client, SUBMIT_QUEUE) == [[job_id]] and messages(redis_client, COPY_QUEUE) == []
    last = store.events(job_id)[-1]
    assert (last.from_state, last.to_state) == ("queued", "queued")
    assert last.detail == {"action": "retry", "mode": "submit", "via": "test", "lookup_first": True}
    assert job_id in store.due(now=job.updated_at + 200)


def test_a_retried_submit_answers_the_job_as_the_retry_left_it_though_a_worker_was_faster(
        store: JobStore, redis_url: str) -> None:
    """A worker may take the submit the moment it is sent. The answer (what the API and the CLI print) is the job as
    the retry left it, `queued` with its note, not what the worker made of it since: tests/e2e/test_ops.py's CLI
    retry printed `generated` once, when its worker won that race."""

    class FastWorker(Enqueuer):
        def submit(self, job_id: str, *, countdown: float | None = None, request_id: str | None = None) -> None:
            super().submit(job_id, countdown=countdown, request_id=request_id)
            store.step(job_id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "task-fast"})

    app = make_celery(redis_url)
    try:
        job_id = failed_job(store, "submit_exhausted")
        job = retry_job(store, FastWorker(app), job_id, detail={"via": "test"}).job
    finally:
        app.close()
    assert job.state is JobState.QUEUED and job.kling_task_id is None
    assert store.events(job_id)[-2].detail == {"action": "retry", "mode": "submit", "via": "test", "lookup_first": True}
    assert store.require(job_id).state is JobState.SUBMITTED  # the worker's step did happen, after the answer


@pytest.mark.parametrize(("reason", "task_id", "words"), [
    ("kling_failed", "task-9", "new job"),
    ("timed_out", None, "deadline"),
    ("something_new", None, "no retry rule"),
])
def test_retry_is_refused_when_it_could_make_a_second_task_or_cannot_help(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis, reason: str, task_id: str | None,
        words: str) -> None:
    job_id = failed_job(store, reason, task_id=task_id)
    before = (store.require(job_id), store.events(job_id))
    with pytest.raises(ActionRefused) as refused:
        retry_job(store, enqueuer, job_id)
    assert words in refused.value.reason and refused.value.job.state is JobState.FAILED
    assert (store.require(job_id), store.events(job_id)) == before
    assert messages(redis_client, SUBMIT_QUEUE) == messages(redis_client, COPY_QUEUE) == []


def test_a_submit_side_failure_with_a_task_id_from_a_late_callback_resubmits_with_a_lookup(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis) -> None:
    job_id = failed_job(store, "submit_exhausted")
    assert store.set_kling_task_id(job_id, "task-late", source="callback") == (True, None)
    job = retry_job(store, enqueuer, job_id).job
    assert job.state is JobState.QUEUED and job.kling_task_id == "task-late" and job.attempts == {"create_sent": 1}
    assert messages(redis_client, SUBMIT_QUEUE) == [[job_id]]


def test_retry_is_refused_past_the_deadline(store: JobStore, enqueuer: Enqueuer) -> None:
    job_id = failed_job(store, "submit_exhausted", deadline_seconds=100)
    job = store.require(job_id)
    assert retry_mode(job, now=job.created_at + 99) == "submit"
    with pytest.raises(ActionRefused, match="deadline"):
        retry_mode(job, now=job.created_at + 100)


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.SUBMITTED, JobState.GENERATED, JobState.STORED,
                                   JobState.CANCELED])
def test_retry_is_refused_outside_failed(store: JobStore, enqueuer: Enqueuer, state: JobState) -> None:
    job, _ = store.create(dict(REQUEST))
    if state is not JobState.QUEUED:
        store.step(job.id, state, source="worker")
    with pytest.raises(ActionRefused, match=f"this job is {state.value}"):
        retry_job(store, enqueuer, job.id)
    assert store.require(job.id).state is state


def test_unknown_jobs(store: JobStore, enqueuer: Enqueuer) -> None:
    with pytest.raises(JobNotFound):
        retry_job(store, enqueuer, "job_nope")
    with pytest.raises(JobNotFound):
        cancel(store, enqueuer, "job_nope")


def test_racing_retries_apply_once(store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis) -> None:
    job_id = failed_job(store, "submit_exhausted")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        try:
            retry_job(store, enqueuer, job_id)
            outcomes.append("applied")
        except ActionRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["applied"] + ["refused"] * 7
    assert messages(redis_client, SUBMIT_QUEUE) == [[job_id]]
    assert [e.to_state for e in store.events(job_id)].count("queued") == 3  # created, retried, the retry's note


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.SUBMITTED, JobState.PROCESSING, JobState.GENERATED])
def test_cancel_from_every_live_state(store: JobStore, enqueuer: Enqueuer, state: JobState) -> None:
    job, _ = store.create(dict(REQUEST), due_in=10)
    if state is not JobState.QUEUED:
        store.step(job.id, state, source="worker", set_fields={"kling_task_id": "task-7"}, due_in=10)
    result = cancel(store, enqueuer, job.id, detail={"via": "test", "reason": "not needed"})
    assert result.applied and result.from_state is state and result.job.state is JobState.CANCELED
    event = store.events(job.id)[-1]
    assert (event.from_state, event.to_state, event.source) == (state.value, "canceled", "api")
    assert event.detail["action"] == "cancel" and event.detail["reason"] == "not needed"
    assert ("kling_task_id" in event.detail) is (state is not JobState.QUEUED)
    assert store.due(now=job.created_at + 1e6) == []


@pytest.mark.parametrize("state", [JobState.STORED, JobState.FAILED, JobState.CANCELED])
def test_cancel_of_a_finished_job_is_refused_and_changes_nothing(store: JobStore, enqueuer: Enqueuer,
                                                                  state: JobState) -> None:
    job, _ = store.create(dict(REQUEST))
    store.step(job.id, state, source="worker")
    before = store.events(job.id)
    with pytest.raises(ActionRefused, match=f"already {state.value}"):
        cancel(store, enqueuer, job.id)
    assert store.events(job.id) == before and store.require(job.id).state is state


def test_a_canceled_job_ignores_later_steps(store: JobStore, enqueuer: Enqueuer) -> None:
    job, _ = store.create(dict(REQUEST))
    store.step(job.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "t"})
    cancel(store, enqueuer, job.id)
    for state in (JobState.PROCESSING, JobState.GENERATED, JobState.STORED, JobState.FAILED):
        assert not store.step(job.id, state, source="callback").applied
    assert store.require(job.id).state is JobState.CANCELED


def test_a_broker_that_is_down_does_not_undo_the_retry(store: JobStore) -> None:
    from tests.support.procs import free_port

    app = make_celery(f"redis://127.0.0.1:{free_port()}/0", broker_connection_timeout=0.2,
                      broker_connection_max_retries=0, task_publish_retry=False)
    try:
        job_id = failed_job(store, "copy_exhausted", task_id="task-2", via=[JobState.GENERATED])
        result = retry_job(store, Enqueuer(app), job_id, due_in=30)
    finally:
        app.close()
    assert result.job.state is JobState.GENERATED
    assert job_id in store.due(now=result.job.updated_at + 31)  # the reconciler queues the copy


def test_retried_submit_adopts_the_task_an_earlier_create_made(tmp_path: Path, redis_url: str,
                                                                redis_client: redis.Redis) -> None:
    """The dangerous case: submit_exhausted after a create that did reach Kling. The retry must not create again
    (external_task_id is unique at Kling): the pipeline's next submit finds the task and adopts it."""
    with running_simulator(tmp_path, "--submitted-seconds", "30") as sim:
        settings = load_settings(relay_env(
            REDIS_URL=redis_url, KLING_BASE_URL=sim.base_url, KLING_ACCESS_KEY=sim.access_key or "",
            KLING_SECRET_KEY=sim.secret_key or "", PUBLIC_BASE_URL="http://127.0.0.1:9", S3_BUCKET="unused"))
        app = make_celery(redis_url)
        rt = Runtime.from_settings(settings, app)
        try:
            store = rt.store
            job, _ = store.create({**REQUEST, "image_list": [{"image": image_b64(400, 300, (10, 120, 200))}]})
            with KlingClient(sim.base_url, access_key=sim.access_key, secret_key=sim.secret_key,
                             timeout=(5, 10)) as kling:  # the create whose answer was lost
                made = kling.create_multi_image2video({**store.request(job.id), "external_task_id": job.id})
            store.bump_attempt(job.id, "submit")
            store.step(job.id, JobState.FAILED, source="worker", due_in=None,
                       set_fields={"error": {"reason": "submit_exhausted", "code": None, "message": "x"}})

            retry_job(store, rt.enqueuer, job.id)
            assert messages(redis_client, SUBMIT_QUEUE) == [[job.id]]
            assert pipeline.submit_job(rt, job.id) == "found"
        finally:
            rt.redis.close()
            app.close()
        stats = sim.stats()
    assert stats["tasks_by_external_id"] == {job.id: [made.task_id]} and stats["tasks_created"] == 1
    after = store.require(job.id)
    assert after.state is JobState.SUBMITTED and after.kling_task_id == made.task_id


@pytest.mark.parametrize("reason", ["x" * 100_000, "bad \udcff bytes", "\ud800", "bell\x07", 5],
                         ids=["100k-chars", "surrogateescape", "lone-surrogate", "control", "not-a-string"])
def test_a_reason_the_api_would_refuse_is_refused_here_too_and_changes_nothing(
        store: JobStore, enqueuer: Enqueuer, redis_client: redis.Redis, reason: object) -> None:
    """Issue: the CLI and the client stored a 100,000-character reason, and one that is not UTF-8 crashed."""
    failed = failed_job(store, "submit_exhausted")
    queued, _ = store.create(dict(REQUEST))
    before = {job_id: (store.require(job_id), store.events(job_id)) for job_id in (failed, queued.id)}
    with pytest.raises(ValidationFailed) as refused:
        retry_job(store, enqueuer, failed, detail={"via": "test", "reason": reason})
    assert [p.field for p in refused.value.problems] == ["reason"]
    with pytest.raises(ValidationFailed):
        cancel(store, enqueuer, queued.id, detail={"via": "test", "reason": reason})
    assert {job_id: (store.require(job_id), store.events(job_id)) for job_id in before} == before
    assert messages(redis_client, SUBMIT_QUEUE) == []


def test_a_reason_of_the_limit_with_newlines_is_recorded(store: JobStore, enqueuer: Enqueuer) -> None:
    queued, _ = store.create(dict(REQUEST))
    reason = ("line\n\t" * 100)[:MAX_REASON_CHARS]
    cancel(store, enqueuer, queued.id, detail={"reason": reason})
    assert store.events(queued.id)[-1].detail["reason"] == reason


@pytest.mark.parametrize("suffix", [":events", ":request"])
def test_an_id_naming_another_key_is_an_unknown_job(store: JobStore, enqueuer: Enqueuer, suffix: str) -> None:
    """Issue: `job_…:events` read the job's events list and failed with a Redis error instead of "no such job"."""
    job_id = failed_job(store, "submit_exhausted")
    with pytest.raises(JobNotFound):
        retry_job(store, enqueuer, job_id + suffix)
    with pytest.raises(JobNotFound):
        cancel(store, enqueuer, job_id + suffix)
    assert store.require(job_id).state is JobState.FAILED
