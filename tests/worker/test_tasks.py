"""The worker's Celery app: the reconciler on beat's schedule, its own queue, every task registered, and
retries that only the job's own attempt budgets end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from kling_relay.shared import pipeline
from kling_relay.shared.logs import add, bound_fields
from kling_relay.shared.queue import (
    COPY_TASK,
    NOTIFY_TASK,
    RECONCILE_QUEUE,
    RECONCILE_TASK,
    REQUEST_ID_HEADER,
    SUBMIT_TASK,
)
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import load_settings
from kling_relay.worker.tasks import create_worker_app
from tests.support.settings_env import relay_env

ENV = relay_env(RECONCILE_INTERVAL_SECONDS="7")


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    """One worker app for the module: its tasks are shared (registered on every app finalized later, under the
    same names), so a second app in this process would warn and keep calling the first one's tasks."""
    worker_app = create_worker_app(load_settings(ENV))
    yield worker_app
    worker_app.close()


def test_beat_schedules_the_reconciler_on_its_own_queue(app: Celery) -> None:
    entry = app.conf.beat_schedule["reconcile"]
    assert entry["task"] == RECONCILE_TASK and entry["schedule"] == 7.0
    assert entry["options"] == {"queue": RECONCILE_QUEUE, "expires": 7.0}
    assert app.amqp.router.route({}, RECONCILE_TASK)["queue"].name == RECONCILE_QUEUE
    assert {SUBMIT_TASK, COPY_TASK, NOTIFY_TASK, RECONCILE_TASK} <= set(app.tasks)


def test_pipeline_tasks_leave_the_retry_limit_to_the_job_budgets(app: Celery) -> None:
    """Issue 7, item 1: Celery's default max_retries (3) must not cap the pipeline tasks' retries."""
    assert [app.tasks[name].max_retries for name in (SUBMIT_TASK, COPY_TASK, NOTIFY_TASK)] == [None] * 3


@pytest.mark.parametrize(("task_name", "step", "args"), [
    (SUBMIT_TASK, "submit_job", ["job_1"]),
    (COPY_TASK, "copy_job", ["job_1"]),
    (NOTIFY_TASK, "notify_job", ["job_1", "stored"]),
])
def test_a_step_asking_to_retry_six_times_is_retried_six_times(app: Celery, monkeypatch: pytest.MonkeyPatch,
                                                               task_name: str, step: str, args: list[str]) -> None:
    """Issue 7, item 1: a chain ended at the fourth retry with MaxRetriesExceededError (the tasks passed
    `retry(max_retries=None)`, which means "the default, 3"). Run eagerly, each retry runs at once."""
    calls: list[tuple[Any, ...]] = []

    def flaky(rt: Runtime, *step_args: str) -> str:
        calls.append(step_args)
        if len(calls) <= 6:
            raise pipeline.RetryIn(0.0, f"failure {len(calls)}")
        return "done"

    monkeypatch.setattr(pipeline, step, flaky)
    result = app.tasks[task_name].apply(args=args)
    assert result.state == "SUCCESS", result.result
    assert result.result == "done"
    assert calls == [tuple(args)] * 7


def test_a_task_binds_its_job_id_and_the_request_id_of_its_message(app: Celery,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10.6: every log line of a task carries `job_id`, and a submit's lines the `X-Request-ID` that queued
    it (a message header), through its retries too; `kling_task_id` once the step learns it."""
    seen: list[dict[str, Any]] = []

    def step(rt: Runtime, job_id: str) -> str:
        seen.append(bound_fields())
        if len(seen) == 1:
            add(kling_task_id="task-9")
            seen.append(bound_fields())
            raise pipeline.RetryIn(0.0, "once more")
        return "done"

    monkeypatch.setattr(pipeline, "submit_job", step)
    result = app.tasks[SUBMIT_TASK].apply(args=["job_abc"], headers={REQUEST_ID_HEADER: "req-42"})
    assert result.state == "SUCCESS", result.result
    assert seen == [{"job_id": "job_abc", "request_id": "req-42"},
                    {"job_id": "job_abc", "request_id": "req-42", "kling_task_id": "task-9"},
                    {"job_id": "job_abc", "request_id": "req-42"}]
    assert bound_fields() == {}  # nothing left bound after the task


def test_a_request_id_header_that_is_not_sane_is_left_out(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(pipeline, "submit_job", lambda rt, job_id: seen.append(bound_fields()) or "done")
    app.tasks[SUBMIT_TASK].apply(args=["job_abc"], headers={REQUEST_ID_HEADER: "forged\nline"})
    assert seen == [{"job_id": "job_abc"}]
