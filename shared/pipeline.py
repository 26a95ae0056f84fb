"""The pipeline's steps as plain functions: submit to Kling, apply a task status, copy into S3, notify.

Celery tasks (worker/tasks.py) and Flask views (webhook/) only call these. A function that wants to be run
again later raises `RetryIn(seconds)`; the caller decides how (a Celery retry with a countdown). Attempts are
counted in the job record, not in the message, so a redelivered message does not reset them; throttles (1302/1303,
the shared rate limit, the in-flight cap) and pauses count apart (`<kind>_throttled`) and use no attempt.

Every step leaves a non-terminal job in the due index with a time after which the reconciler
(`shared/reconcile.py`) may assume the work was lost: `RECONCILE_QUIET_SECONDS` after a state step, past the
retry's countdown after a RetryIn, the probe interval while submission is paused (`shared/flow.py`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from kling_relay.shared import flow
from kling_relay.shared.backoff import backoff_seconds
from kling_relay.shared.flow import RateLimited
from kling_relay.shared.jobs import Job, JobState, StepResult
from kling_relay.shared.kling import (
    KlingAmbiguous,
    KlingError,
    KlingFixAccount,
    KlingFixRequest,
    KlingTask,
    KlingTaskNotFound,
)
from kling_relay.shared.locks import job_lock
from kling_relay.shared.notify import NotifyError, deliver, event_payload, publish
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.storage import CopyCanceled, CopyError, copy_videos
from kling_relay.shared.tokens import callback_token
from kling_relay.shared.urlguard import UrlRefused

log = logging.getLogger(__name__)

KLING_STATUS_TO_STATE = {
    "submitted": JobState.SUBMITTED,
    "processing": JobState.PROCESSING,
    "succeed": JobState.GENERATED,
    "failed": JobState.FAILED,
}
NOTIFY_MAX_ATTEMPTS = 10
#: Attempt counter of creates sent to Kling for a job (see _submit_to_kling: a lookup comes first once it is > 0).
CREATE_SENT = "create_sent"


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
    """Fail the job if `attempt` used up the budget, else note it and raise RetryIn with back-off.

    The job's due time moves past the retry, so the reconciler only steps in if the retry message is lost.
    """
    if attempt >= max_attempts:
        fail(rt, job_id, exhausted, source="worker")
        return
    delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
    rt.store.note(job_id, source="worker", detail={"retry_in": round(delay, 1), "reason": reason, "attempt": attempt})
    rt.store.set_due(job_id, delay + rt.settings.reconcile_quiet_seconds)
    raise RetryIn(delay, reason)


def _is_throttle(exc: KlingError) -> bool:
    """Kling said "too fast" or "too many in flight" (1302/1303), or our own shared rate limit said so."""
    return isinstance(exc, RateLimited) or exc.code in flow.THROTTLE_CODES


def _throttle_if_throttled(rt: Runtime, job_id: str, kind: str, exc: KlingError, reason: str) -> None:
    """Back off without using an attempt when `exc` is a throttle (1302/1303 or our own rate limit)."""
    if isinstance(exc, RateLimited):  # our own limiter: wait what it says, no event (it is not Kling's answer)
        _throttle(rt, job_id, kind, reason, retry_after=exc.retry_after, note=False)
    if _is_throttle(exc):
        _throttle(rt, job_id, kind, reason)


def _throttle(rt: Runtime, job_id: str, kind: str, reason: str, *, retry_after: float | None = None,
              note: bool = True) -> NoReturn:
    """Try `kind` (submit, copy) again later without using up its attempts: back off on its own counter.

    Throttles are not the job's fault, so they count in `<kind>_throttled`, which the attempt budget leaves out;
    the job's deadline still bounds how long it can wait. `retry_after` (from our own rate limiter) replaces
    the exponential delay with that wait plus jitter.
    """
    count = rt.store.bump_attempt(job_id, f"{kind}_throttled")
    if retry_after is not None:
        delay = retry_after + random.uniform(0, max(0.5, retry_after))
    else:
        delay = backoff_seconds(count, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
    if note:
        rt.store.note(job_id, source="worker", detail={"throttled": reason, "retry_in": round(delay, 1)})
    rt.store.set_due(job_id, delay + rt.settings.reconcile_quiet_seconds)
    raise RetryIn(delay, reason)


def _pause_for(rt: Runtime, job_id: str, kind: str, exc: KlingError) -> str:
    """An account/auth answer: pause submission for everyone; this job keeps its state and waits (no attempt used)."""
    flow.pause(rt.redis, code=exc.code, message=exc.message, job_id=job_id)
    rt.store.bump_attempt(job_id, f"{kind}_throttled")
    rt.store.note(job_id, source="worker", detail={"paused": flow.pause_reason(exc.code), "code": exc.code,
                                                    "message": exc.message})
    rt.store.set_due(job_id, rt.settings.kling_pause_probe_seconds)
    return "paused"


def _failure_for(exc: KlingError) -> Failure:
    return Failure(f"kling_rejected:{exc.code}", exc.message, exc.code)


def _effective_attempt(rt: Runtime, job: Job, kind: str) -> int:
    """Count this attempt of `kind`; return how many attempts so far count against its budget (throttles don't).

    `job` must have been read under the step's lock, so its throttle counter is current.
    """
    attempt = rt.store.bump_attempt(job.id, kind)
    return attempt - job.attempts.get(f"{kind}_throttled", 0)


# --- submit -----------------------------------------------------------------------------------------------------

def submit_job(rt: Runtime, job_id: str) -> str:
    """Create the Kling task for a queued job, at most once. Returns what happened (for logs and tests).

    Guards, in order: the job must be `queued`; a per-job lock (another worker submitting the same job: return
    `busy`, the reconciler comes back); the pause (`paused`: the job stays queued and due, no Kling call); the
    in-flight cap and the shared rate limit (RetryIn, no attempt used). Then a lookup by external_task_id if an
    earlier attempt may have reached Kling, and the create.
    """
    return _under_job_lock(rt, "submit", job_id, JobState.QUEUED, _submit_locked)


def _submit_locked(rt: Runtime, job_id: str) -> str:
    job = rt.store.get(job_id)  # again, under the lock: another worker may have submitted it meanwhile
    if job is None:
        return "missing"
    if job.state is not JobState.QUEUED:
        return "skipped"
    gate = flow.gate(rt.redis, job_id)
    if gate == "paused":
        pause = flow.current_pause(rt.redis) or {}
        rt.store.note(job_id, source="worker", detail={"waiting": "submission paused", "code": pause.get("code")})
        rt.store.set_due(job_id, rt.settings.kling_pause_probe_seconds)
        return "paused"
    cap = rt.settings.kling_max_in_flight
    reservation_ttl = 2 * (rt.settings.kling_connect_timeout_seconds + rt.settings.kling_timeout_seconds) + 10
    if not flow.reserve_in_flight(rt.redis, job_id, cap, reservation_ttl):
        _throttle(rt, job_id, "submit", f"{cap} tasks in flight at Kling", note=False)
    try:
        return _submit_to_kling(rt, job, trial=gate == "trial")
    finally:
        flow.release_in_flight(rt.redis, job_id)


def _submit_to_kling(rt: Runtime, job: Job, *, trial: bool) -> str:
    job_id = job.id
    attempt = _effective_attempt(rt, job, "submit")
    max_attempts = rt.settings.submit_max_attempts
    exhausted = Failure("submit_exhausted", f"Kling did not accept the task after {attempt} attempts")

    # Look first whenever a create may already have reached Kling: counted by creates sent (and kept by an ops
    # retry), never inferred from the attempt budget, which throttles leave out.
    create_sent = job.attempts.get(CREATE_SENT, 0) > 0 or job.kling_task_id is not None
    if create_sent:
        # An earlier create may have reached Kling (ambiguous create, a worker killed mid-request): look first.
        try:
            task = rt.kling.get_task_by_external_id(job_id)
        except KlingTaskNotFound:
            pass
        except KlingFixAccount as exc:
            return _pause_for(rt, job_id, "submit", exc)
        except KlingError as exc:
            _throttle_if_throttled(rt, job_id, "submit", exc, f"lookup: {exc.message}")
            # Whatever the lookup's error, the task may exist at Kling: never fail at once, spend the budget.
            _retry_or_fail(rt, job_id, attempt, max_attempts, f"lookup: {exc.kind}: {exc.message}", exhausted)
            return "failed"
        else:
            record_task(rt, job_id, task, source="worker", detail={"found_by": "external_task_id"})
            return "found"

    body = {**rt.store.request(job_id), "callback_url": callback_url(rt, job_id), "external_task_id": job_id}
    rt.store.bump_attempt(job_id, CREATE_SENT)  # before sending: a worker killed mid-create still looks first next
    try:
        try:
            task = rt.kling.create_multi_image2video(body)
        except KlingError as exc:
            if not create_sent and not isinstance(exc, KlingAmbiguous):
                rt.store.forget_attempt(job_id, CREATE_SENT)  # Kling said no (or it was never sent): no task exists
            raise
    except KlingAmbiguous as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"ambiguous create: {exc.message}", exhausted)
        return "failed"
    except KlingTaskNotFound as exc:  # 1203 on create is not a request problem of ours: try again later
        _retry_or_fail(rt, job_id, attempt, max_attempts, exc.message, exhausted)
        return "failed"
    except KlingFixRequest as exc:
        if create_sent and exc.code == 1201 and "external_task_id" in exc.message:
            # our own earlier create exists but the lookup did not see it yet: look again later, never create twice
            _retry_or_fail(rt, job_id, attempt, max_attempts, "external_task_id exists; looking it up", exhausted)
            return "failed"
        fail(rt, job_id, _failure_for(exc), source="worker")
        return "failed"
    except KlingFixAccount as exc:
        return _pause_for(rt, job_id, "submit", exc)
    except KlingError as exc:
        _throttle_if_throttled(rt, job_id, "submit", exc, f"{exc.kind}: {exc.message}")
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"{exc.kind}: {exc.message}", exhausted)
        return "failed"
    record_task(rt, job_id, task, source="worker", detail={"created": True})
    if trial:
        flow.resume(rt.redis, by=f"trial submit of {job_id}")
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
    """Copy a generated job's video(s) into S3, then mark it stored. A re-run after success does nothing.

    A per-job lock, kept alive by a heartbeat while the copy runs, keeps a re-queued copy (the reconciler's, or a
    redelivered message) from copying the same job at the same time: the second one returns `busy`. A worker
    killed mid-copy stops the heartbeat, so the lock lapses within `JOB_LOCK_SECONDS` and the job can be rescued.
    """
    return _under_job_lock(rt, "copy", job_id, JobState.GENERATED, _copy_locked)


def _under_job_lock(rt: Runtime, step: str, job_id: str, expected: JobState,
                    body: Callable[[Runtime, str], str]) -> str:
    """Run `body` for a job in state `expected` while holding its per-job `step` lock (renewed by a heartbeat).

    `missing` / `skipped` when the job is gone or not in that state, `busy` when another worker holds the lock;
    `body` checks the state again under the lock.
    """
    job = rt.store.get(job_id)
    if job is None:
        return "missing"
    if job.state is not expected:
        return "skipped"
    lock = job_lock(rt.redis, step, job_id, rt.settings.job_lock_seconds)
    if not lock.acquire():
        return "busy"
    try:
        with lock.heartbeat():
            return body(rt, job_id)
    finally:
        lock.release()


def _copy_locked(rt: Runtime, job_id: str) -> str:
    job = rt.store.get(job_id)
    if job is None:
        return "missing"
    if job.state is not JobState.GENERATED:
        return "skipped"
    assert job.kling_task_id is not None
    attempt = _effective_attempt(rt, job, "copy")
    max_attempts = rt.settings.copy_max_attempts
    exhausted = Failure("copy_exhausted", f"could not copy the video after {attempt} attempts")
    try:
        task = rt.kling.get_task(job.kling_task_id)  # a fresh URL: never trust the callback body for it
    except KlingFixAccount as exc:  # credentials or account broken: pause submission, retry the copy later
        flow.pause(rt.redis, code=exc.code, message=exc.message, job_id=job_id)
        _throttle(rt, job_id, "copy", f"{flow.pause_reason(exc.code)} error {exc.code}: {exc.message}")
    except KlingError as exc:
        _throttle_if_throttled(rt, job_id, "copy", exc, f"re-reading task: {exc.message}")
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"re-reading task: {exc.message}", exhausted)
        return "failed"
    if task.task_id != job.kling_task_id or task.external_task_id not in (None, job.id):
        # Never store another job's video under this job's keys, whatever bound the task id.
        message = f"Kling task {task.task_id} belongs to {task.external_task_id!r}, not this job"
        fail(rt, job_id, Failure("copy_exhausted", message), source="worker")
        return "failed"
    if task.status != "succeed" or not task.videos:
        rt.store.note(job_id, source="worker", detail={"copy": "task has no video", "kling_status": task.status})
        _retry_or_fail(rt, job_id, attempt, max_attempts, "task has no video yet", exhausted)
        return "failed"
    recorded = _manifest_request(rt.store.request(job.id))
    try:
        for video in task.videos:  # scheme/host/port first, before touching S3 (addresses are checked on connect)
            rt.allowlist.match(video.url)
        stored = copy_videos(
            job.id, job.created_at, task.task_id, [(v.id, v.url, v.duration) for v in task.videos],
            rt.storage, rt.allowlist, rt.http,
            extra_manifest={"metadata": job.metadata, "request": recorded},
            max_bytes=rt.settings.max_video_bytes, still_wanted=lambda: _in_state(rt, job_id, JobState.GENERATED),
        )
    except CopyCanceled:
        log.info("copy dropped: the job was canceled or ended meanwhile", extra={"job_id": job_id})
        return "skipped"
    except UrlRefused as exc:
        fail(rt, job_id, Failure("copy_exhausted", f"video URL refused: {exc.reason}"), source="worker")
        return "failed"
    except CopyError as exc:
        _retry_or_fail(rt, job_id, attempt, max_attempts, f"copy: {exc}", exhausted)
        return "failed"
    videos = [v.as_dict() for v in stored]
    result = rt.store.step(job_id, JobState.STORED, source="worker", detail={"videos": len(videos)},
                           set_fields={"videos": videos}, only_from=[JobState.GENERATED], due_in=None)
    if not result.applied and result.job.state is not JobState.STORED:
        # Canceled or ended between the manifest and this step: take the result back out of S3.
        rt.storage.delete([*(v["key"] for v in videos), rt.storage.manifest_key(job.id, job.created_at)])
        log.warning("copy withdrawn: the job ended meanwhile", extra={"job_id": job_id,
                                                                     "state": result.job.state.value})
        return "skipped"
    if result.applied:
        log.info("stored", extra={"job_id": job_id, "keys": [v["key"] for v in videos]})
        rt.store.replace_request(job_id, recorded)  # the images are no longer needed: free their memory in Redis
        finished(rt, result.job)
    return "stored"


def copy_overran(rt: Runtime, job_id: str) -> str:
    """The copy hit its time limit (the worker's soft limit): count it like any failed copy attempt."""
    job = rt.store.get(job_id)
    if job is None or job.state is not JobState.GENERATED:
        return "skipped"
    attempt = job.attempts.get("copy", 0) - job.attempts.get("copy_throttled", 0)
    exhausted = Failure("copy_exhausted", f"the copy overran its time limit ({attempt} attempts)")
    _retry_or_fail(rt, job_id, attempt, rt.settings.copy_max_attempts, "copy overran its time limit", exhausted)
    return "failed"


def _in_state(rt: Runtime, job_id: str, state: JobState) -> bool:
    job = rt.store.get(job_id)
    return job is not None and job.state is state


def _manifest_request(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the manifest records it: everything but the images' base64 payloads (idempotent)."""
    if "image_list" not in request:
        return request  # already recorded this way (a stored job's request)
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
        status = deliver(job.notify_url, rt.settings.notify_secret, f"msg_{job_id}_{state}", payload, session=rt.http,
                         allowlist=rt.notify_allowlist)
    except NotifyError as exc:
        if not exc.retryable or attempt >= NOTIFY_MAX_ATTEMPTS:
            rt.store.note(job_id, source="worker", detail={"notify": "gave up", "error": str(exc)})
            return "gave_up"
        delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
        raise RetryIn(delay, str(exc)) from exc
    rt.store.note(job_id, source="worker", detail={"notify": "delivered", "http_status": status})
    return "delivered"
