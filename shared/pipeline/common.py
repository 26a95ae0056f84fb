"""What every pipeline step shares: outcomes, failures, the retry and throttle back-off, the Kling error policy,
the per-job lock, and announcing a step (the consumers' stream, notifications).

A step that wants to run again later raises `RetryIn(seconds)`; the Celery task turns it into a retry with that
countdown. Attempts are counted in the job record (`attempt:<kind>`), not in the message, so a redelivered message
does not reset them; throttles and pauses count apart (`<kind>_throttled`) and use no attempt.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn

from kling_relay.shared import flow, metrics, stats
from kling_relay.shared.backoff import backoff_seconds
from kling_relay.shared.flow import RateLimited
from kling_relay.shared.jobs import Job, JobState, StepResult
from kling_relay.shared.kling import KlingError, KlingFixAccount, KlingFixRequest
from kling_relay.shared.kling_codes import THROTTLE_CODES, pause_reason
from kling_relay.shared.locks import job_lock
from kling_relay.shared.logs import add
from kling_relay.shared.notify import EventsStream, announce

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one run of a step did (returned by the Celery tasks, logged, asserted by tests)."""

    MISSING = "missing"  # no such job (expired or deleted)
    SKIPPED = "skipped"  # the job is not (or no longer) in the state this step works on
    BUSY = "busy"  # another worker holds the job's lock for this step
    PAUSED = "paused"  # submission or copying is paused, or the copy waits on a setting: the job waits, due
    AWAITING = "awaiting"  # submit: a create may have reached Kling and tasks cannot be read back: wait for a callback
    FOUND = "found"  # submit: the job's task already existed at Kling and was adopted
    SUBMITTED = "submitted"  # submit: Kling created the task
    FAILED = "failed"  # the attempt failed: the job failed, or the step raised RetryIn before returning this
    STORED = "stored"  # copy: the video(s) and the manifest are in S3
    DELIVERED = "delivered"  # notify: the receiver answered 2xx
    GAVE_UP = "gave_up"  # notify: no retry can help, or the attempts are used up


class Decision(StrEnum):
    """What a step does about a Kling error (`decide`)."""

    PAUSE = "pause"  # credentials or account: pause submission for everyone, this job waits without an attempt
    THROTTLE = "throttle"  # too fast / too many in flight (Kling's 1302/1303 or our own limiter): back off freely
    FAIL = "fail"  # a definite refusal of the request: the same request would fail again
    RETRY = "retry"  # anything else (server errors, ambiguous outcomes, odd answers): spend an attempt


def decide(exc: KlingError) -> Decision:
    """The one policy for Kling errors, shared by the lookup, the create and the copy's re-read of the task.

    Every refusal of the request is a FAIL, 1203 ("resource does not exist") included: on a create it names the
    model or another resource the request needs, and the same create would be refused until the budget ran out.
    Steps may soften a FAIL (a lookup never fails a job and reads 1203 as "no task"; the copy never fails on
    Kling's word; a refused create whose earlier attempt may have made the task retries, so the next attempt looks
    it up first) but never harden a RETRY.
    """
    if isinstance(exc, KlingFixAccount):
        return Decision.PAUSE
    if isinstance(exc, RateLimited) or exc.code in THROTTLE_CODES:
        return Decision.THROTTLE
    if isinstance(exc, KlingFixRequest):  # KlingTaskNotFound (1203) is one
        return Decision.FAIL
    return Decision.RETRY


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

    @classmethod
    def rejected(cls, exc: KlingError) -> Failure:
        """Kling refused the request: `kling_rejected:<code>` with Kling's message."""
        return cls(f"kling_rejected:{exc.code}", exc.message, exc.code)


@dataclass(frozen=True)
class Budget:
    """One attempt of a step against its budget: which attempt this is and the failure once it is used up."""

    kind: str  # "submit" or "copy": the attempt counter and the throttle counter `<kind>_throttled`
    attempt: int
    max_attempts: int
    exhausted: Failure


def fail(rt: Runtime, job_id: str, failure: Failure, *, source: str) -> StepResult:
    result = rt.store.step(job_id, JobState.FAILED, source=source, detail=failure.as_error(),
                           set_fields={"error": failure.as_error()}, due_in=None)
    if result.applied:
        log.warning("job failed", extra={"job_id": job_id, "reason": failure.reason})
        finished(rt, result.job)
    return result


def retry_or_fail(rt: Runtime, job_id: str, budget: Budget, reason: str) -> Outcome:
    """Fail the job if this attempt used up the budget, else note it and raise RetryIn with back-off.

    The job's due time moves past the retry, so the reconciler only steps in if the retry message is lost. The
    failure's message ends with the last attempt's reason (e.g. what a gateway answered instead of Kling's envelope).
    """
    if budget.attempt >= budget.max_attempts:
        exhausted = budget.exhausted
        fail(rt, job_id, Failure(exhausted.reason, f"{exhausted.message}; last: {reason}"[:1000], exhausted.code),
             source="worker")
        return Outcome.FAILED
    delay = backoff_seconds(budget.attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
    rt.store.note(job_id, source="worker", detail={"retry_in": round(delay, 1), "reason": reason,
                                                    "attempt": budget.attempt})
    rt.store.set_due(job_id, delay + rt.settings.reconcile_quiet_seconds)
    raise RetryIn(delay, reason)


def throttle(rt: Runtime, job_id: str, kind: str, reason: str, *, retry_after: float | None = None,
             note: bool = True, cause: str = "kling_busy") -> NoReturn:
    """Try `kind` (submit, copy) again later without using up its attempts: back off on its own counter.

    Throttles are not the job's fault, so they count in `<kind>_throttled`, which the attempt budget leaves out;
    the job's deadline still bounds how long it can wait. `retry_after` (from our own rate limiter) replaces
    the exponential delay with that wait plus jitter. `cause` (in_flight_cap, rate_limit, kling_busy, paused) is
    the metrics' label.
    """
    metrics.throttled(kind, cause)
    count = rt.store.bump_attempt(job_id, f"{kind}_throttled")
    if retry_after is not None:
        delay = retry_after + random.uniform(0, max(0.5, retry_after))
    else:
        delay = backoff_seconds(count, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
    if note:
        rt.store.note(job_id, source="worker", detail={"throttled": reason, "retry_in": round(delay, 1)})
    rt.store.set_due(job_id, delay + rt.settings.reconcile_quiet_seconds)
    raise RetryIn(delay, reason)


def throttle_for(rt: Runtime, job_id: str, kind: str, exc: KlingError, reason: str) -> NoReturn:
    """Back off after a throttle answer: our own limiter says how long (no event: it is not Kling's answer)."""
    if isinstance(exc, RateLimited):
        throttle(rt, job_id, kind, reason, retry_after=exc.retry_after, note=False, cause="rate_limit")
    throttle(rt, job_id, kind, reason)


def pause_submission(rt: Runtime, job_id: str, exc: KlingError) -> None:
    """An account/auth answer: pause submission for everyone (see `flow`); the job keeps its state."""
    flow.pause(rt.redis, code=exc.code, message=exc.message, job_id=job_id)


def on_kling_error(rt: Runtime, job_id: str, budget: Budget, exc: KlingError, context: str, *,
                   refusal_fails: bool) -> Outcome:
    """Apply `decide(exc)` for a step: pause, throttle (raises RetryIn), fail, or retry (raises RetryIn or fails).

    `refusal_fails` False turns a FAIL into a RETRY (a lookup, or a create that an earlier attempt may have made);
    the budget's `exhausted` failure then says what ends the job.
    """
    decision = decide(exc)
    reason = f"{exc.kind} {context}: {exc.message}"  # e.g. "ambiguous create: ...", "retry_later lookup: ..."
    if decision is Decision.PAUSE:
        pause_submission(rt, job_id, exc)
        if budget.kind == "submit":  # the job stays queued and due: the probe resumes it
            rt.store.bump_attempt(job_id, "submit_throttled")
            rt.store.note(job_id, source="worker", detail={"paused": pause_reason(exc.code), "code": exc.code,
                                                            "message": exc.message})
            rt.store.set_due(job_id, rt.settings.kling_pause_probe_seconds)
            return Outcome.PAUSED
        throttle(rt, job_id, budget.kind, f"{pause_reason(exc.code)} error {exc.code}: {exc.message}",
                 cause="paused")
    if decision is Decision.THROTTLE:
        throttle_for(rt, job_id, budget.kind, exc, reason)
    if decision is Decision.FAIL and refusal_fails:
        fail(rt, job_id, Failure.rejected(exc), source="worker")
        return Outcome.FAILED
    return retry_or_fail(rt, job_id, budget, reason)


def count_attempt(rt: Runtime, job: Job, kind: str) -> int:
    """Count this attempt of `kind`; return how many attempts so far count against its budget (throttles don't).

    `job` must have been read under the step's lock, so its throttle counter is current.
    """
    attempt = rt.store.bump_attempt(job.id, kind)
    return attempt - job.attempts.get(f"{kind}_throttled", 0)


def under_job_lock(rt: Runtime, step: str, job_id: str, expected: JobState,
                   body: Callable[[Runtime, Job], Outcome]) -> Outcome:
    """Run `body` for a job in state `expected` while holding its per-job `step` lock (renewed by a heartbeat).

    `missing` / `skipped` when the job is gone or not in that state, `busy` when another worker holds the lock.
    `body` gets the job as read again under the lock (another worker may have moved it meanwhile).
    """
    job = rt.store.get(job_id)
    if job is None:
        return Outcome.MISSING
    if job.state is not expected:
        return Outcome.SKIPPED
    lock = job_lock(rt.redis, step, job_id, rt.settings.job_lock_seconds)
    if not lock.acquire():
        return Outcome.BUSY
    try:
        with lock.heartbeat():
            job = rt.store.get(job_id)
            if job is None:
                return Outcome.MISSING
            if job.state is not expected:
                return Outcome.SKIPPED
            add(kling_task_id=job.kling_task_id)  # on every log line of the task from here, once it is known
            return body(rt, job)
    finally:
        lock.release()


def in_state(rt: Runtime, job_id: str, state: JobState) -> bool:
    job = rt.store.get(job_id)
    return job is not None and job.state is state


def finished(rt: Runtime, job: Job) -> None:
    """A step just took the job to stored or failed: count it for the dashboard (`stats`), announce it."""
    try:
        stats.count_finished(rt.redis, job.state.value, reason=str((job.error or {}).get("reason") or ""))
    except Exception:  # a counter never costs a step
        log.warning("could not count the finished job", extra={"job_id": job.id}, exc_info=True)
    announced(rt, job)


def announced(rt: Runtime, job: Job) -> None:
    """Announce the step that just left `job` as it is (the job as the applied step returned it): a terminal
    state to the consumers' stream, a state the job asked for to its `notify_url` (`kling_relay.shared.notify`)."""
    announce(rt.store, rt.enqueuer, job, EventsStream.of(rt.settings))
