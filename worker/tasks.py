"""Celery tasks: thin wrappers that hand a job id to the plain functions in kling_relay.shared.pipeline and
kling_relay.shared.reconcile."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import celeryd_after_setup

from kling_relay.shared import metrics, pipeline
from kling_relay.shared.logs import bound, is_request_id
from kling_relay.shared.queue import (
    COPY_TASK,
    COPY_TIME_LIMIT_SECONDS,
    NOTIFY_TASK,
    RECONCILE_QUEUE,
    RECONCILE_TASK,
    REQUEST_ID_HEADER,
    SUBMIT_TASK,
    make_celery,
)
from kling_relay.shared.reconcile import reconcile
from kling_relay.shared.runtime import Runtime, limited_kling_client
from kling_relay.shared.settings import Settings, load_settings

log = logging.getLogger(__name__)

_TASK_NAMES = {SUBMIT_TASK: "submit", COPY_TASK: "copy", NOTIFY_TASK: "notify"}  # the metrics' task label
RECONCILE_TIME_LIMIT_SECONDS = 600
SUBMIT_TIME_LIMIT_SECONDS = 600
# Every task that retries (submit, copy, notify) is declared with `max_retries=None`: Celery never caps its
# retries. Celery's default `max_retries` is 3, and `task.retry(max_retries=None)` falls back to it, so without
# it a fourth retry raises MaxRetriesExceededError and the job drops out of its back-off. The budgets counted
# in the job record (SUBMIT_MAX_ATTEMPTS, COPY_MAX_ATTEMPTS, the notify budget) are the only limits, and
# throttles, which spend no attempt, back off for as long as the job's deadline allows.


@celeryd_after_setup.connect
def consume_reconcile_queue(sender: str, instance: Any, **kwargs: Any) -> None:
    """Every worker also takes reconcile passes, whatever queues it was started with (`--queues submit,copy`)."""
    instance.app.amqp.queues.select_add(RECONCILE_QUEUE)


def request_id_of(task: Task) -> str | None:
    """The request id the task's message carries (`REQUEST_ID_HEADER`, set by Enqueuer.submit), if it is sane."""
    headers = getattr(task.request, "headers", None) or {}
    value = headers.get(REQUEST_ID_HEADER) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(task.request, REQUEST_ID_HEADER, None)
    return value if isinstance(value, str) and is_request_id(value) else None


def worker_runtime(settings: Settings, app: Celery) -> Runtime:
    """The Runtime of one worker process: its Kling client takes every request through the shared rate limit."""
    rt = Runtime.from_settings(settings, app)
    rt.kling.close()
    rt.kling = limited_kling_client(settings, rt.redis)
    return rt


def create_worker_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app with the pipeline tasks registered and the reconciler on beat's schedule.

    The Runtime is built lazily in each process (after the fork), so each worker process has its own connections.
    """
    settings = settings or load_settings()
    app = make_celery(settings.redis_url)
    interval = settings.reconcile_interval_seconds
    app.conf.beat_schedule = {
        "reconcile": {"task": RECONCILE_TASK, "schedule": interval,
                      "options": {"queue": RECONCILE_QUEUE, "expires": max(1.0, interval)}},
    }
    runtime: dict[str, Runtime] = {}

    def rt() -> Runtime:
        if "rt" not in runtime:
            runtime["rt"] = worker_runtime(settings, app)
        return runtime["rt"]

    def run(task: Task, step: Any, *args: str) -> str:
        """Run one pipeline step with `job_id` (and the request id that queued a submit) bound to every log line
        of the task; the pipeline adds `kling_task_id` once it is known (shared/pipeline/common.py). Every run's
        outcome is counted here, once for every task."""
        name = _TASK_NAMES.get(task.name, "other")
        request_id = request_id_of(task)
        with bound(job_id=args[0], request_id=request_id):
            try:
                outcome: str = step(rt(), *args)
            except pipeline.RetryIn as retry:
                metrics.task_run(name, "retry")
                log.info("retrying later", extra={"countdown": retry.seconds, "reason": retry.reason})
                # no limit: the task's own max_retries is None (see above); the job's attempt budgets decide. The
                # retried message keeps the request's headers, the request id among them.
                raise task.retry(countdown=retry.seconds) from None
            except Exception:
                metrics.task_run(name, "error")
                raise
            metrics.task_run(name, str(outcome))
            log.info("task done", extra={"task": task.name, "outcome": outcome})
            return outcome

    # A submit that hangs (a resolver without timeout, a trickling answer) is cut off: its lock lapses and the
    # job, still queued and due, is sent again by the reconciler, which looks the task up first.
    @app.task(name=SUBMIT_TASK, bind=True, max_retries=None, time_limit=SUBMIT_TIME_LIMIT_SECONDS,
              soft_time_limit=SUBMIT_TIME_LIMIT_SECONDS - 30)
    def submit_job(self: Task, job_id: str) -> str:
        return run(self, pipeline.submit_job, job_id)

    @app.task(name=COPY_TASK, bind=True, max_retries=None, time_limit=COPY_TIME_LIMIT_SECONDS,
              soft_time_limit=COPY_TIME_LIMIT_SECONDS - 60)
    def copy_video(self: Task, job_id: str) -> str:
        try:
            return run(self, pipeline.copy_job, job_id)
        except SoftTimeLimitExceeded:  # the upload was aborted on the way out; count it as a failed attempt
            return run(self, pipeline.copy_overran, job_id)

    @app.task(name=NOTIFY_TASK, bind=True, max_retries=None)
    def notify_job(self: Task, job_id: str, state: str) -> str:
        return run(self, pipeline.notify_job, job_id, state)

    @app.task(name=RECONCILE_TASK, time_limit=RECONCILE_TIME_LIMIT_SECONDS,
              soft_time_limit=RECONCILE_TIME_LIMIT_SECONDS - 30)
    def reconcile_pass() -> dict[str, Any]:
        try:
            report = reconcile(rt())
        except Exception:
            metrics.task_run("reconcile", "error")
            raise
        metrics.task_run("reconcile", "ran" if report.ran else "locked")
        log.info("reconcile pass", extra=report.summary())
        return report.summary()

    return app
