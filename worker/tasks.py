"""Celery tasks: thin wrappers that hand a job id to the plain functions in shared.pipeline."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from shared import pipeline
from shared.queue import COPY_TASK, COPY_TIME_LIMIT_SECONDS, NOTIFY_TASK, SUBMIT_TASK, make_celery
from shared.runtime import Runtime
from shared.settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_worker_app(settings: Settings | None = None) -> Celery:
    """The worker's Celery app with the pipeline tasks registered; the Runtime is built lazily in each process."""
    settings = settings or load_settings()
    app = make_celery(settings.redis_url)
    runtime: dict[str, Runtime] = {}

    def rt() -> Runtime:
        if "rt" not in runtime:  # after fork: each worker process gets its own connections
            runtime["rt"] = Runtime.from_settings(settings, app)
        return runtime["rt"]

    def run(task: Task, step: Any, *args: str) -> str:
        try:
            outcome: str = step(rt(), *args)
        except pipeline.RetryIn as retry:
            log.info("retrying later", extra={"job_id": args[0], "countdown": retry.seconds, "reason": retry.reason})
            raise task.retry(countdown=retry.seconds, max_retries=None) from None
        log.info("task done", extra={"job_id": args[0], "task": task.name, "outcome": outcome})
        return outcome

    @app.task(name=SUBMIT_TASK, bind=True)
    def submit_job(self: Task, job_id: str) -> str:
        return run(self, pipeline.submit_job, job_id)

    @app.task(name=COPY_TASK, bind=True, time_limit=COPY_TIME_LIMIT_SECONDS,
              soft_time_limit=COPY_TIME_LIMIT_SECONDS - 60)
    def copy_video(self: Task, job_id: str) -> str:
        return run(self, pipeline.copy_job, job_id)

    @app.task(name=NOTIFY_TASK, bind=True)
    def notify_job(self: Task, job_id: str, state: str) -> str:
        return run(self, pipeline.notify_job, job_id, state)

    return app
