"""Ops actions on one job: retry a failed job, cancel an unfinished one. Used by the HTTP API, the client, the CLI.

Retry rules. Kling keeps `external_task_id` (our job id) unique per account, so a job can make at most one
Kling task, ever. A retry therefore never asks Kling for a second task; what it may do depends on why the
job failed:
- `copy_exhausted` (the video was generated, copying it failed): back to `generated` (failed → queued → generated,
  two steps) and the copy is queued again; the copy re-reads the task from Kling for a fresh URL.
- `submit_exhausted`, `auth`, `account`, `invalid`, `kling_rejected:<code>`: back to `queued` and the submit is
  queued again. An earlier create may still have reached Kling (an ambiguous create is exactly what exhausts a
  submit; a late callback may even have recorded its task id), so the retry spends one submit attempt at once:
  the pipeline looks the task up by `external_task_id` before any create when the attempt is not the first, and
  adopts the task if it exists. A create after a lookup that missed it is refused by Kling as a duplicate.
- Refused: `kling_failed` (Kling's one task for this job failed; a new create would be refused as a duplicate:
  submit the request again as a new job), `timed_out` and any job past its deadline (a retry does not move the
  deadline, the reconciler would time it out again), and any reason without a rule.

Cancel: queued, submitted, processing and generated jobs become `canceled`. Kling has no cancel API: a task
already made keeps running there (and is billed); its callbacks change nothing afterwards, and the copy of a
canceled job does nothing. Terminal jobs are refused. Like every terminal step, a cancellation goes to the
consumers' events stream and, when the job asked for it, to its `notify_url` (`kling_relay.shared.notify`).

Input is checked first, the same way for the HTTP API, the Python client and the CLI (`check_action`): an id that
is not a job id is `JobNotFound` (nothing is read), and a `reason` in the detail must be valid text of at most
limits.REASON_MAX_CHARS characters without control characters other than newline and tab (`ValidationFailed` otherwise,
with the problem under the field `reason`; nothing is changed).

Both raise `JobNotFound` for an unknown job and `ActionRefused` (with a sentence saying why) when the job's state
or history does not allow the action. Every applied action is a state step with `source="api"` and an event
whose detail says what was done and by whom (`detail` from the caller: e.g. `{"via": "cli", "reason": ...}`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kling_relay.shared import copy_flow, flow, heard, usage
from kling_relay.shared.inputs import is_job_id, reason_problem
from kling_relay.shared.jobs import Job, JobNotFound, JobState, JobStore, StepResult
from kling_relay.shared.jobs_model import CREATE_SENT
from kling_relay.shared.notify import EventsStream, announce
from kling_relay.shared.queue import Enqueuer
from kling_relay.shared.validation import FieldProblem, ValidationFailed, text_problems

log = logging.getLogger(__name__)

__all__ = ["ActionRefused", "JobNotFound", "action_problems", "cancel_job", "check_action",
           "retry_job", "retry_mode"]

CANCELABLE: frozenset[JobState] = frozenset(
    {JobState.QUEUED, JobState.SUBMITTED, JobState.PROCESSING, JobState.GENERATED})
RESUBMIT_REASONS: frozenset[str] = frozenset({"submit_exhausted", "auth", "account", "invalid"})
RESUBMIT_PREFIXES: tuple[str, ...] = ("kling_rejected:",)
COPY_REASONS: frozenset[str] = frozenset({"copy_exhausted"})
DEFAULT_DUE_SECONDS = 120.0


class ActionRefused(Exception):
    """The action does not apply to this job as it is; `reason` says why, `job` is the job as it was read."""

    def __init__(self, job: Job, reason: str) -> None:
        super().__init__(reason)
        self.job = job
        self.reason = reason


def action_problems(reason: object) -> list[FieldProblem]:
    """The problems with an ops action's `reason` (None: no reason given), each under the field `reason`."""
    problem = reason_problem(reason)
    return [] if problem is None else [FieldProblem("reason", problem)]


def check_action(job_id: str, detail: dict[str, Any] | None) -> None:
    """Refuse an ops action's input before anything is read: JobNotFound for an id that is not a job id,
    ValidationFailed for a `reason` (in `detail`) that is not a string of valid text within the limits."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id)
    detail = detail or {}
    problems = action_problems(detail.get("reason"))
    for key, value in detail.items():  # the rest (who, via what) is the caller's own, but must be storable too
        if key != "reason":
            problems += text_problems(value, str(key))
    if problems:
        raise ValidationFailed(problems)


def retry_mode(job: Job, *, now: float | None = None) -> str:
    """How a retry would resume this failed job: "submit" or "copy"; raises ActionRefused when it may not."""
    if job.state is not JobState.FAILED:
        raise ActionRefused(job, f"only a failed job can be retried; this job is {job.state.value}")
    if job.deadline_at is not None and (time.time() if now is None else now) >= job.deadline_at:
        raise ActionRefused(job, "the job is past its deadline (JOB_DEADLINE_SECONDS after creation) and a retry "
                                 "does not extend it: submit the request as a new job")
    reason = str((job.error or {}).get("reason") or "")
    if reason in COPY_REASONS:
        if job.kling_task_id is None:
            raise ActionRefused(job, "the copy failed but the job has no Kling task to copy from")
        return "copy"
    if reason == "kling_failed":
        raise ActionRefused(job, "Kling's task for this job failed; Kling keeps external_task_id (the job id) "
                                 "unique, so this job cannot make another task: submit the request as a new job")
    if reason == "timed_out":
        raise ActionRefused(job, "the job is past its deadline (timed_out) and a retry does not extend it: "
                                 "submit the request as a new job")
    if reason in RESUBMIT_REASONS or reason.startswith(RESUBMIT_PREFIXES):
        # Even with a kling_task_id (a late callback of an ambiguous create can bring one), the retried submit
        # looks the task up first and adopts it; it creates only when Kling has none for this job.
        return "submit"
    raise ActionRefused(job, f"no retry rule for a job that failed with {reason or 'no reason'!r}")


def submission_status(store: JobStore, *, now: float | None = None) -> dict[str, Any]:
    """Submission open or paused (and why), tasks in flight at Kling, copying open or paused (and why) with the
    jobs whose copy waits on a setting, jobs per state, the units Kling deducted in the UTC day and month of `now`
    (default: the clock; see `usage.spent`), and the jobs awaiting a callback because their create's outcome is
    unknown in callbacks-only mode (GET /v1/status)."""
    return {**flow.status(store.redis), **copy_flow.status(store.redis), "jobs": store.counts(),
            "units": usage.spent(store.redis, now=now), "awaiting_callback": heard.awaiting(store.redis, store.get)}


def _require_seen(store: JobStore, job_id: str, app: str | None) -> Job:
    """The job, if `app` (None: an operator, who sees every job) may see it; else JobNotFound, as for an unknown
    id (another app's job is not even hinted at)."""
    job = store.require(job_id)
    if app is not None and job.app != app:
        raise JobNotFound(job_id)
    return job


def retry_job(store: JobStore, enqueuer: Enqueuer, job_id: str, *, detail: dict[str, Any] | None = None,
              due_in: float = DEFAULT_DUE_SECONDS, app: str | None = None) -> StepResult:
    """Put a failed job back to work (see the module docstring for which failures qualify and how).

    Returns the result of the last step taken (`applied` True, `job` as the retry left it, `from_state` failed).
    `due_in` (seconds, normally RECONCILE_QUIET_SECONDS) puts the job in the due index, so the reconciler re-sends
    the work if the message queued here is lost. A broker that is down does not undo the retry: the job stays
    due and the reconciler sends it. `app`: the caller's app; another app's job is `JobNotFound` (None: all).
    """
    check_action(job_id, detail)
    job = _require_seen(store, job_id, app)
    mode = retry_mode(job)
    who = {"action": "retry", "mode": mode, **(detail or {})}
    result = store.retry(job_id, source="api", due_in=due_in)
    if not result.applied:  # it changed between the read and the step (another retry won)
        raise ActionRefused(result.job, f"only a failed job can be retried; this job is {result.job.state.value}")
    # The retry reset the attempt counters; mark a create as possibly sent, so any submit of this job from here on
    # looks the task up by external_task_id before it creates one (an earlier, ambiguous create may have made it).
    # For a copy retry this only matters if we die before the next step: the reconciler then re-sends the submit,
    # and the lookup finds the succeeded task instead of a create being refused as a duplicate.
    store.bump_attempt(job_id, CREATE_SENT)
    if mode == "copy":
        # copy_exhausted happens only to a generated job: Kling's task succeeded, so this restores its state.
        result = store.step(job_id, JobState.GENERATED, source="api", detail=who, only_from=[JobState.QUEUED],
                            due_in=due_in)
        if result.applied:
            announce(store, enqueuer, result.job, None)  # a notification, if the job asked for `generated`
            _send(lambda: enqueuer.copy(job_id), job_id, "copy")
        return StepResult(applied=True, job=result.job, from_state=JobState.FAILED)
    store.note(job_id, source="api", detail={**who, "lookup_first": True})
    job = store.require(job_id)  # read before the send: a worker may take the submit at once and move the job on
    _send(lambda: enqueuer.submit(job_id), job_id, "submit")
    return StepResult(applied=True, job=job, from_state=JobState.FAILED)


def cancel_job(store: JobStore, enqueuer: Enqueuer, job_id: str, *, stream: EventsStream,
               detail: dict[str, Any] | None = None, app: str | None = None) -> StepResult:
    """Move a queued, submitted, processing or generated job to `canceled`; ActionRefused for a finished one.
    `app`: the caller's app; another app's job is `JobNotFound` (None: an operator, any job).

    A Kling task the job already has is not stopped (Kling cannot cancel one); the event's detail says so. The
    cancellation is announced like any terminal step: an entry in the events `stream`, and a notification if the
    job's `notify_events` has `canceled` (the default).
    """
    check_action(job_id, detail)
    job = _require_seen(store, job_id, app)
    if job.state not in CANCELABLE:
        raise ActionRefused(job, f"the job is already {job.state.value}; only queued, submitted, processing or "
                                 f"generated jobs can be canceled")
    info: dict[str, Any] = {"action": "cancel", **(detail or {})}
    if job.kling_task_id is not None:
        info["kling_task_id"] = job.kling_task_id
        info["note"] = "Kling has no cancel API: its task may still finish (and be billed); nothing is copied"
    result = store.step(job_id, JobState.CANCELED, source="api", detail=info, due_in=None)
    if not result.applied:  # it finished between the read and the step
        raise ActionRefused(result.job, f"the job is already {result.job.state.value}; only queued, submitted, "
                                        f"processing or generated jobs can be canceled")
    log.info("job canceled", extra={"job_id": job_id, "from": result.from_state.value})
    announce(store, enqueuer, result.job, stream)
    return result


def _send(send: Callable[[], None], job_id: str, what: str) -> None:
    try:
        send()
    except Exception:  # the job is due: the reconciler sends the work when the broker is back
        log.exception("could not queue %s after retry; the reconciler will", what, extra={"job_id": job_id})
