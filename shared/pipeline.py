"""The pipeline's steps as plain functions: submit to Kling, apply a task status, copy into S3, notify.

Celery tasks (worker/tasks.py) and Flask views (webhook/) only call these. A function that wants to be run
again later raises `RetryIn(seconds)`; the caller decides how (a Celery retry with a countdown). Attempts are
counted in the job record, not in the message, so a redelivered message does not reset them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from shared.backoff import backoff_seconds
from shared.jobs import Job, JobState, StepResult
from shared.kling import (
    KlingAmbiguous,
    KlingError,
    KlingFixAccount,
    KlingFixRequest,
    KlingTask,
    KlingTaskNotFound,
)
from shared.notify import NotifyError, deliver, event_payload, publish
from shared.runtime import Runtime
from shared.storage import CopyError, copy_videos
from shared.tokens import callback_token
from shared.urlguard import UrlRefused

log = logging.getLogger(__name__)

KLING_STATUS_TO_STATE = {
    "submitted": JobState.SUBMITTED,
    "processing": JobState.PROCESSING,
    "succeed": JobState.GENERATED,
    "failed": JobState.FAILED,
}
AUTH_CODES = range(1000, 1005)
NOTIFY_MAX_ATTEMPTS = 10


class RetryIn(Exception):  # noqa: N818 - it is an instruction, not an error
    """Run this step again after `seconds`."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"retry in {seconds:.1f}s: {reason}")
        self.seconds = seconds
        self.reason = reason


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    code: int | None = None

    def as_error(self) -> dict[str, Any]:
        return {"reason": self.reason, "code": self.code, "message": self.message}


def callback_url(rt: Runtime, job_id: str) -> str:
    token = callback_token(rt.settings.callback_secret, job_id)
    return f"{rt.settings.public_base_url}/callbacks/kling/{job_id}?token={token}"


def fail(rt: Runtime, job_id: str, failure: Failure, *, source: str) -> StepResult:
    result = rt.store.step(job_id, JobState.FAILED, source=source, detail=failure.as_error(),
                           set_fields={"error": failure.as_error()}, due_in=None)
    if result.applied:
        log.warning("job failed", extra={"job_id": job_id, "reason": failure.reason})
        finished(rt, result.job)
    return result


def _retry_or_fail(rt: Runtime, job_id: str, attempt: int, max_attempts: int, reason: str,
                   exhausted: Failure) -> None:
    if attempt >= max_attempts:
        fail(rt, job_id, exhausted, source="worker")
        return
    delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
    rt.store.note(job_id, source="worker", detail={"retry_in": round(delay, 1), "reason": reason, "attempt": attempt})
    raise RetryIn(delay, reason)


def _failure_for(exc: KlingError) -> Failure:
    if isinstance(exc, KlingFixAccount):
        reason = "auth" if exc.code in AUTH_CODES else "account"
        return Failure(reason, exc.message, exc.code)
    return Failure(f"kling_rejected:{exc.code}", exc.message, exc.code)


# --- submit -----------------------------------------------------------------------------------------------------

def submit_job(rt: Runtime, job_id: str) -> str:
    """Create the Kling task for a queued job, at most once. Returns what happened (for logs and tests)."""
    job = rt.store.get(job_id)
    if job is None:
        return "missing"
    if job.state is not JobState.QUEUED:
        return "skipped"
    attempt = rt.store.bump_attempt(job_id, "submit")
    max_attempts = rt.settings.submit_max_attempts
    exhausted = Failure("submit_exhausted", f"Kling did not accept the task after {attempt} attempts")

    if attempt > 1:
        # An earlier attempt may have reached Kling (ambiguous create, a worker killed mid-request): look first.
        try:
            task = rt.kling.get_task_by_external_id(job_id)
        except KlingTaskNotFound:
            pass
        except KlingError as exc:
            if not exc.retryable:
                fail(rt, job_id, _failure_for(exc), source="worker")
                return "failed"
            _retry_or_fail(rt, job_id, attempt, max_attempts, f"lookup: {exc.kind}", exhausted)
            return "failed"
        else:
            record_task(rt, job_id, task, source="worker", detail={"found_by": "external_task_id"})
            return "found"

    body = {**rt.store.request(job_id), "callback_url": callback_url(rt, job_id), "external_task_id": job_id}
    try:
        task = rt.kling.create_multi_image2video(body)
    except KlingAmbiguous as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"ambiguous create: {exc.message}", exhausted)
        return "failed"
    except KlingTaskNotFound as exc:  # 1203 on create is not a request problem of ours: try again later
        _retry_or_fail(rt, job_id, attempt, max_attempts, exc.message, exhausted)
        return "failed"
    except KlingFixRequest as exc:
        if attempt > 1 and exc.code == 1201 and "external_task_id" in exc.message:
            # our own earlier create exists but the lookup did not see it yet: look again later, never create twice
            _retry_or_fail(rt, job_id, attempt, max_attempts, "external_task_id exists; looking it up", exhausted)
            return "failed"
        fail(rt, job_id, _failure_for(exc), source="worker")
        return "failed"
    except KlingFixAccount as exc:
        fail(rt, job_id, _failure_for(exc), source="worker")
        return "failed"
    except KlingError as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"{exc.kind}: {exc.message}", exhausted)
        return "failed"
    record_task(rt, job_id, task, source="worker", detail={"created": True})
    return "submitted"


def record_task(rt: Runtime, job_id: str, task: KlingTask, *, source: str, detail: dict[str, Any]) -> None:
    ok, existing = rt.store.set_kling_task_id(job_id, task.task_id, source=source)
    if not ok:
        log.error("job already has another Kling task", extra={"job_id": job_id, "kling_task_id": existing})
        return
    rt.store.step(job_id, JobState.SUBMITTED, source=source, detail={"kling_task_id": task.task_id, **detail},
                  set_fields={"kling_task_id": task.task_id}, due_in=rt.settings.reconcile_quiet_seconds)
    if task.status != "submitted":
        apply_task_status(rt, job_id, task, source=source)


# --- status changes (webhook, reconciler) ------------------------------------------------------------------------

def apply_task_status(rt: Runtime, job_id: str, task: KlingTask, *, source: str) -> StepResult:
    """One state step from a Kling task status; a generated job gets its copy queued exactly once."""
    to = KLING_STATUS_TO_STATE[task.status]
    detail: dict[str, Any] = {"kling_status": task.status}
    if to is JobState.FAILED:
        failure = Failure("kling_failed", task.status_msg or "Kling reported the task failed")
        result = rt.store.step(job_id, to, source=source, detail={**detail, **failure.as_error()},
                               set_fields={"error": failure.as_error()}, due_in=None)
        if result.applied:
            finished(rt, result.job)
        return result
    due = rt.settings.reconcile_quiet_seconds
    result = rt.store.step(job_id, to, source=source, detail=detail, due_in=due)
    if result.applied and to is JobState.GENERATED:
        try:
            rt.enqueuer.copy(job_id)
        except Exception:  # the job is generated and due: the reconciler re-queues its copy
            log.exception("could not queue copy", extra={"job_id": job_id})
    return result


# --- copy ---------------------------------------------------------------------------------------------------------

def copy_job(rt: Runtime, job_id: str) -> str:
    """Copy a generated job's video(s) into S3, then mark it stored. A re-run after success does nothing."""
    job = rt.store.get(job_id)
    if job is None:
        return "missing"
    if job.state is not JobState.GENERATED:
        return "skipped"
    assert job.kling_task_id is not None
    attempt = rt.store.bump_attempt(job_id, "copy")
    max_attempts = rt.settings.copy_max_attempts
    exhausted = Failure("copy_exhausted", f"could not copy the video after {attempt} attempts")
    try:
        task = rt.kling.get_task(job.kling_task_id)  # a fresh URL: never trust the callback body for it
    except KlingError as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"re-reading task: {exc.message}", exhausted)
        return "failed"
    if task.status != "succeed" or not task.videos:
        rt.store.note(job_id, source="worker", detail={"copy": "task has no video", "kling_status": task.status})
        _retry_or_fail(rt, job_id, attempt, max_attempts, "task has no video yet", exhausted)
        return "failed"
    try:
        stored = copy_videos(
            job.id, job.created_at, task.task_id, [(v.id, v.url, v.duration) for v in task.videos],
            rt.storage, rt.allowlist, rt.http,
            extra_manifest={"metadata": job.metadata, "request": _manifest_request(rt.store.request(job.id))},
        )
    except UrlRefused as exc:
        fail(rt, job_id, Failure("copy_exhausted", f"video URL refused: {exc.reason}"), source="worker")
        return "failed"
    except CopyError as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"copy: {exc}", exhausted)
        return "failed"
    videos = [v.as_dict() for v in stored]
    result = rt.store.step(job_id, JobState.STORED, source="worker", detail={"videos": len(videos)},
                           set_fields={"videos": videos}, only_from=[JobState.GENERATED], due_in=None)
    if result.applied:
        log.info("stored", extra={"job_id": job_id, "keys": [v["key"] for v in videos]})
        finished(rt, result.job)
    return "stored"


def _manifest_request(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the manifest records it: everything but the images' base64 payloads."""
    images = [item["image"] if str(item.get("image", "")).startswith(("http://", "https://")) else "<base64>"
              for item in request.get("image_list", [])]
    return {**{k: v for k, v in request.items() if k != "image_list"}, "images": images}


# --- tell the world -------------------------------------------------------------------------------------------------

def finished(rt: Runtime, job: Job) -> None:
    """A job reached stored or failed: append it to the consumers' stream and queue its notification."""
    public = rt.store.require(job.id).public_dict()
    try:
        publish(rt.redis, rt.settings.events_stream, public)
    except Exception:
        log.exception("could not publish the finished job", extra={"job_id": job.id})
    if job.notify_url:
        try:
            rt.enqueuer.notify(job.id, job.state.value)
        except Exception:
            log.exception("could not queue the notification", extra={"job_id": job.id})


def notify_job(rt: Runtime, job_id: str, state: str) -> str:
    job = rt.store.get(job_id)
    if job is None or not job.notify_url or rt.settings.notify_secret is None:
        return "skipped"
    attempt = rt.store.bump_attempt(job_id, "notify")
    payload = event_payload(job.public_dict())
    try:
        status = deliver(job.notify_url, rt.settings.notify_secret, f"msg_{job_id}_{state}", payload, session=rt.http)
    except NotifyError as exc:
        if not exc.retryable or attempt >= NOTIFY_MAX_ATTEMPTS:
            rt.store.note(job_id, source="worker", detail={"notify": "gave up", "error": str(exc)})
            return "gave_up"
        delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
        raise RetryIn(delay, str(exc)) from exc
    rt.store.note(job_id, source="worker", detail={"notify": "delivered", "http_status": status})
    return "delivered"
