"""The consumers' contract at the level of the plain functions (issue 8, item 8): one stream entry per terminal
transition, canceled included, with its ISO-8601 time; `notify_events` chooses the states a job's notify_url hears
of; a step whose process died before announcing it is announced by the reconciler (at-least-once).

Real redis-server and Celery broker lists; the simulator only because a Runtime needs a Kling base URL.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from kling_relay.shared import keys
from kling_relay.shared.jobs import Job, JobState
from kling_relay.shared.jobs_model import DEFAULT_NOTIFY_EVENTS, iso_utc
from kling_relay.shared.kling import KlingTask, TaskStatus
from kling_relay.shared.notify import EventsStream, announce
from kling_relay.shared.ops import cancel_job, retry_job
from kling_relay.shared.pipeline import apply_task_status, fail, record_task
from kling_relay.shared.pipeline.common import Failure
from kling_relay.shared.queue import NOTIFY_QUEUE
from kling_relay.shared.reconcile import ANNOUNCE_GRACE_SECONDS, reconcile
from kling_relay.shared.runtime import Runtime
from tests.support.relay_runtime import REQUEST, close_runtime, make_runtime, relay_settings
from tests.support.sim import SimHandle, sim_fixture

STREAM = "kling-relay:events"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HOOK = "https://app.example.com/hook"


sim = sim_fixture("--callback-retries", "0")


@pytest.fixture()
def runtime(redis_url: str, sim: SimHandle) -> Iterator[Runtime]:
    rt = make_runtime(relay_settings(redis_url, sim, NOTIFY_SECRET="notify-secret-0123456789",
                                     EVENTS_STREAM_MAXLEN="50"))
    yield rt
    close_runtime(rt)


def entries(rt: Runtime, job_id: str | None = None) -> list[dict[str, str]]:
    return [fields for _, fields in rt.redis.xrange(STREAM) if job_id is None or fields["job_id"] == job_id]


def notified(rt: Runtime) -> list[list[Any]]:
    """The [job_id, state] of every notification waiting in the Celery queue, oldest first."""
    out = []
    for raw in reversed(rt.redis.lrange(NOTIFY_QUEUE, 0, -1)):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        out.append(args)
    return out


def new_job(rt: Runtime, **kwargs: Any) -> Job:
    job, _ = rt.store.create(dict(REQUEST), due_in=60, **kwargs)
    return job


def task(job: Job, status: TaskStatus) -> KlingTask:
    return KlingTask(task_id=f"task-{job.id}", status=status, external_task_id=job.id)


def test_a_canceled_job_gets_a_stream_entry_and_its_notification(runtime: Runtime) -> None:
    """Before: `cancel_job` made the step only: no stream entry, no notification, for a job in any state."""
    job = new_job(runtime, notify_url=HOOK)
    result = cancel_job(runtime.store, runtime.enqueuer, job.id, stream=EventsStream.of(runtime.settings))
    [entry] = entries(runtime, job.id)
    assert entry["state"] == "canceled" and entry["at"] == iso_utc(result.job.updated_at)
    payload = json.loads(entry["payload"])
    assert payload["type"] == "job.canceled" and payload["timestamp"] == entry["at"]
    assert payload["data"]["state"] == "canceled" and payload["data"]["notify_events"] == list(DEFAULT_NOTIFY_EVENTS)
    assert notified(runtime) == [[job.id, "canceled"]]
    assert runtime.redis.zcard(keys.OUTBOX) == 0


def test_stream_entries_carry_the_transitions_iso_time(runtime: Runtime) -> None:
    """Before: `at` was missing and the payload's `timestamp` was a float of the publishing time."""
    job = new_job(runtime)
    result = fail(runtime, job.id, Failure("invalid", "bad"), source="worker")
    [entry] = entries(runtime, job.id)
    assert ISO.match(entry["at"]) and entry["at"] == iso_utc(result.job.updated_at)
    assert entry["at"] == runtime.store.events(job.id)[-1].as_dict()["at"]  # the failing step's own time
    assert json.loads(entry["payload"])["timestamp"] == entry["at"]


def test_a_retried_job_has_a_failed_then_a_stored_entry(runtime: Runtime) -> None:
    """A job whose copy was exhausted, retried, then stored: two entries, each with its own transition time."""
    job = new_job(runtime)
    record_task(runtime, job.id, task(job, "succeed"), source="worker", detail={})
    failed = fail(runtime, job.id, Failure("copy_exhausted", "S3 down"), source="worker").job
    retry_job(runtime.store, runtime.enqueuer, job.id)
    stored = runtime.store.step(job.id, JobState.STORED, source="worker", only_from=[JobState.GENERATED])
    assert stored.applied
    announce(runtime.store, runtime.enqueuer, stored.job, EventsStream.of(runtime.settings))
    got = [(e["state"], e["at"]) for e in entries(runtime, job.id)]
    assert got == [("failed", iso_utc(failed.updated_at)), ("stored", iso_utc(stored.job.updated_at))]


def test_notify_events_chooses_the_states_that_are_queued(runtime: Runtime) -> None:
    """A job asking for processing and generated gets them queued as the steps are applied; one without a
    notify_url, or that did not ask, gets nothing for them. Before: only stored/failed were ever queued."""
    asked = new_job(runtime, notify_url=HOOK, notify_events=["processing", "generated", "stored"])
    default = new_job(runtime, notify_url=HOOK)
    silent = new_job(runtime, notify_events=None)
    for job in (asked, default, silent):
        record_task(runtime, job.id, task(job, "submitted"), source="worker", detail={})
        apply_task_status(runtime, job.id, task(job, "processing"), source="callback")
        apply_task_status(runtime, job.id, task(job, "processing"), source="callback")  # a duplicate: no step
        apply_task_status(runtime, job.id, task(job, "succeed"), source="callback")
    assert notified(runtime) == [[asked.id, "processing"], [asked.id, "generated"]]
    fail(runtime, asked.id, Failure("copy_exhausted", "x"), source="worker")  # asked.id did not ask for failed
    fail(runtime, default.id, Failure("copy_exhausted", "x"), source="worker")
    assert notified(runtime)[2:] == [[default.id, "failed"]]
    assert len(entries(runtime)) == 2 and runtime.redis.zcard(keys.OUTBOX) == 0


def test_notify_events_are_stored_in_state_order_and_the_default_is_not_spelled_out(runtime: Runtime) -> None:
    job = new_job(runtime, notify_url=HOOK, notify_events=["stored", "processing"])
    assert runtime.store.require(job.id).notify_events == ("processing", "stored")
    spelled, created = runtime.store.create(dict(REQUEST), notify_url=HOOK, idempotency_key="k",
                                            notify_events=["canceled", "failed", "stored"])
    again, created_again = runtime.store.create(dict(REQUEST), notify_url=HOOK, idempotency_key="k")
    assert created and not created_again and again.id == spelled.id  # the same body: the default, spelled out
    assert again.notify_events == DEFAULT_NOTIFY_EVENTS
    with pytest.raises(ValueError):
        runtime.store.create(dict(REQUEST), notify_url=HOOK, notify_events=["queued"])


def test_a_step_whose_process_died_before_announcing_it_is_announced_by_the_reconciler(runtime: Runtime) -> None:
    """The worker applied `failed` and died before the stream entry and the notification: the outbox, written in
    the step's own script, lets the next reconcile pass after the grace period announce it, once."""
    job = new_job(runtime, notify_url=HOOK, notify_events=["processing", "failed"])
    record_task(runtime, job.id, task(job, "submitted"), source="worker", detail={})
    runtime.redis.delete(NOTIFY_QUEUE)
    processing = runtime.store.step(job.id, JobState.PROCESSING, source="callback").job  # no announce: "died"
    failed = runtime.store.step(job.id, JobState.FAILED, source="worker").job
    assert entries(runtime) == [] and notified(runtime) == []
    early = reconcile(runtime, now=failed.updated_at + 1)
    assert early.announced == [] and entries(runtime) == []  # within the grace period: its own process may still
    report = reconcile(runtime, now=failed.updated_at + ANNOUNCE_GRACE_SECONDS + 1)
    assert report.announced == [job.id, job.id]
    assert [(e["state"], e["at"]) for e in entries(runtime)] == [("failed", iso_utc(failed.updated_at))]
    assert notified(runtime) == [[job.id, "processing"], [job.id, "failed"]]
    assert processing.updated_at < failed.updated_at
    again = reconcile(runtime, now=failed.updated_at + ANNOUNCE_GRACE_SECONDS + 100)
    assert again.announced == [] and len(entries(runtime)) == 1 and runtime.redis.zcard(keys.OUTBOX) == 0


def test_the_stream_is_capped_by_events_stream_maxlen(runtime: Runtime) -> None:
    """EVENTS_STREAM_MAXLEN=50 here: after 400 terminal transitions the stream holds about 50, not 400 (Redis
    trims approximately, whole nodes of up to 100 entries at a time)."""
    for _ in range(400):
        cancel_job(runtime.store, runtime.enqueuer, new_job(runtime).id, stream=EventsStream.of(runtime.settings))
    assert runtime.redis.xlen(STREAM) <= 150
