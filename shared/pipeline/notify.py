"""Notify: POST a finished job to its `notify_url`, signed (Standard Webhooks), retried with back-off."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kling_relay.shared.backoff import backoff_seconds
from kling_relay.shared.notify import NotifyError, deliver, event_payload
from kling_relay.shared.pipeline.common import Outcome, RetryIn

if TYPE_CHECKING:  # the wiring module is handed in, never imported at run time
    from kling_relay.shared.runtime import Runtime

NOTIFY_MAX_ATTEMPTS = 10


def notify_job(rt: Runtime, job_id: str, state: str) -> Outcome:
    """Deliver the job's notification for `state`; retried (RetryIn) while a retry may help, up to the budget."""
    job = rt.store.get(job_id)
    if job is None or not job.notify_url or rt.settings.notify_secret is None:
        return Outcome.SKIPPED
    attempt = rt.store.bump_attempt(job_id, "notify")
    payload = event_payload(job.public_dict())
    try:
        status = deliver(job.notify_url, rt.settings.notify_secret, f"msg_{job_id}_{state}", payload, session=rt.http,
                         allowlist=rt.notify_allowlist)
    except NotifyError as exc:
        if not exc.retryable or attempt >= NOTIFY_MAX_ATTEMPTS:
            rt.store.note(job_id, source="worker", detail={"notify": "gave up", "error": str(exc)})
            return Outcome.GAVE_UP
        delay = backoff_seconds(attempt, base=rt.settings.retry_base_seconds, cap=rt.settings.retry_max_seconds)
        raise RetryIn(delay, str(exc)) from exc
    rt.store.note(job_id, source="worker", detail={"notify": "delivered", "http_status": status})
    return Outcome.DELIVERED
