"""Status changes from Kling (the worker's create or lookup, the webhook, the reconciler): one state step each."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kling_relay.shared import metrics, usage
from kling_relay.shared.jobs import Job, JobState, StepResult
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.logs import add
from kling_relay.shared.pipeline.common import Failure, announced, finished

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

log = logging.getLogger(__name__)
TIMELINE_LIMIT = 1000  # the whole timeline of any job (the store keeps fewer events)

KLING_STATUS_TO_STATE = {
    "submitted": JobState.SUBMITTED,
    "processing": JobState.PROCESSING,
    "succeed": JobState.GENERATED,
    "failed": JobState.FAILED,
}


def record_task(rt: Runtime, job_id: str, task: KlingTask, *, source: str, detail: dict[str, Any]) -> None:
    """Bind the job to the task Kling answered for it (create or lookup), then apply the task's status."""
    ok, existing = rt.store.set_kling_task_id(job_id, task.task_id, source=source)
    if not ok:
        log.error("job already has another Kling task", extra={"job_id": job_id, "kling_task_id": existing})
        return
    add(kling_task_id=task.task_id)  # on the task's log lines from here
    result = rt.store.step(job_id, JobState.SUBMITTED, source=source,
                           detail={"kling_task_id": task.task_id, **detail},
                           set_fields={"kling_task_id": task.task_id}, due_in=rt.settings.reconcile_quiet_seconds)
    if result.applied:
        announced(rt, result.job)  # a notification, if the job asked for `submitted`
    if task.status != "submitted":
        apply_task_status(rt, job_id, task, source=source)


def apply_task_status(rt: Runtime, job_id: str, task: KlingTask, *, source: str) -> StepResult:
    """One state step from a Kling task status; a generated job gets its copy queued exactly once. An applied step
    is announced (a failure to the stream; any state the job asked for to its `notify_url`).

    What Kling billed (`final_unit_deduction`) is recorded first, once per job however often it is reported,
    and whatever the step does (a canceled job's task is billed too): see `shared/usage.py`.
    """
    usage.record_deduction(rt.redis, job_id, task, now=rt.clock())
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
    if result.applied:
        announced(rt, result.job)
    if result.applied and to is JobState.GENERATED:
        _count_generation(rt, result.job)
        try:
            rt.enqueuer.copy(job_id)
        except Exception:  # the job is generated and due: the reconciler re-queues its copy
            log.exception("could not queue copy", extra={"job_id": job_id})
    return result


def _count_generation(rt: Runtime, job: Job) -> None:
    """Observe the time from the job's step into `submitted` to this step into `generated` (its timeline)."""
    for event in rt.store.events(job.id, limit=TIMELINE_LIMIT):
        if event.to_state == JobState.SUBMITTED.value and event.from_state != event.to_state:  # a step, not a note
            metrics.generated(job.updated_at - event.at)
            return
