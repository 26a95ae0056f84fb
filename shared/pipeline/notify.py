"""Notify: POST a job's state to its `notify_url`, signed (Standard Webhooks), retried with back-off.

Queued when a step into a state the job asked for (`notify_events`) is applied. The payload's `type` is that state
(`job.<state>`) and its `timestamp` when the job entered it (from the job's timeline); `data` is the job as it is
at delivery, which may have moved on since (a `job.processing` notification may carry `data.state` `generated`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kling_relay.shared import metrics
from kling_relay.shared.backoff import backoff_seconds
from kling_relay.shared.jobs import Job, JobStore
from kling_relay.shared.jobs_model import NOTIFY_STATES, iso_utc
from kling_relay.shared.notify import NotifyError, deliver, event_payload
from kling_relay.shared.pipeline.common import Outcome, RetryIn

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

NOTIFY_MAX_ATTEMPTS = 10
TIMELINE_LIMIT = 1000


def entered_at(store: JobStore, job: Job, state: str) -> float:
    """When the job last entered `state` (its latest step into it), or its `updated_at` if the timeline has none."""
    for event in reversed(store.events(job.id, limit=TIMELINE_LIMIT)):
        if event.to_state == state and event.from_state != state:
            return event.at
    return job.updated_at


def notify_job(rt: Runtime, job_id: str, state: str) -> Outcome:
    """Deliver the job's notification for `state`; retried (RetryIn) while a retry may help, up to the budget."""
    job = rt.store.get(job_id)
    if job is None or not job.notify_url or rt.settings.notify_secret is None or state not in NOTIFY_STATES:
        return Outcome.SKIPPED
    attempt = rt.store.bump_attempt(job_id, f"notify_{state}")  # each state's notification has its own budget
    payload = event_payload(job.public_dict(), state=state, at=iso_utc(entered_at(rt.store, job, state)))
    try:
        status = deliver(job.notify_url, rt.settings.notify_secret, f"msg_{job_id}_{state}", payload, session=rt.http,
                         allowlist=rt.notify_allowlist)
    except NotifyError as exc:
        if not exc.retryable or attempt >= NOTIFY_MAX_ATTEMPTS:
            rt.store.note(job_id, source="worker", detail={"notify": "gave up", "state": state, "error": str(exc)})
            metrics.notification("gave_up")
            return Outcome.GAVE_UP
        delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
        metrics.notification("retry")
        raise RetryIn(delay, str(exc)) from exc
    metrics.notification("delivered")
    rt.store.note(job_id, source="worker", detail={"notify": "delivered", "state": state, "http_status": status})
    return Outcome.DELIVERED
