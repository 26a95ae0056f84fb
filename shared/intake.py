"""Taking a job in: validate everything, store it, queue it. Used by the HTTP API and the Python client.

Nothing is stored and nothing is queued unless the whole request is valid. The job is stored before its
message is sent; should the send fail, the job stays `queued` with a due time, and the reconciler re-sends it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kling_relay.shared import limits
from kling_relay.shared.jobs import Job, JobStore
from kling_relay.shared.jobs_model import DEFAULT_NOTIFY_EVENTS, NOTIFY_STATES
from kling_relay.shared.queue import Enqueuer
from kling_relay.shared.settings import ClientSettings, Settings
from kling_relay.shared.urlguard import UrlAllowlist, UrlRefused
from kling_relay.shared.validation import FieldProblem, Limits, ValidationFailed, validate_multi_image2video

log = logging.getLogger(__name__)

EXTRA_FIELDS = ("notify_url", "notify_events", "metadata")
MAX_METADATA_BYTES = limits.METADATA_MAX_BYTES
MAX_IDEMPOTENCY_KEY_CHARS = limits.IDEMPOTENCY_KEY_MAX_CHARS


@dataclass(frozen=True)
class Accepted:
    job: Job
    created: bool  # False: an idempotent replay of an earlier identical request


def _extra_problems(extras: dict[str, Any], settings: Settings | ClientSettings) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    if "notify_url" in extras and extras["notify_url"] is not None:
        url = extras["notify_url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        too_long = isinstance(url, str) and len(url) > limits.URL_MAX_CHARS
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or too_long:
            problems.append(FieldProblem("notify_url", f"must be an http(s) URL with a host, at most "
                                                       f"{limits.URL_MAX_CHARS} characters"))
        elif settings.notify_secret is None:
            problems.append(FieldProblem("notify_url", "this relay has no NOTIFY_SECRET configured to sign "
                                                       "notifications; ask its operator or leave notify_url out"))
        else:
            try:  # scheme, host, port and a literal address now; a name's addresses at delivery, after DNS
                UrlAllowlist.parse(settings.notify_url_allowlist, name="NOTIFY_URL_ALLOWLIST").check_without_dns(url)
            except UrlRefused as exc:
                problems.append(FieldProblem("notify_url", f"not allowed: {exc.reason}"))
    problems += _notify_events_problems(extras)
    if "metadata" in extras and extras["metadata"] is not None:
        metadata = extras["metadata"]
        if not isinstance(metadata, dict):
            problems.append(FieldProblem("metadata", "must be a JSON object"))
        elif len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            problems.append(FieldProblem("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON"))
    return problems


def _notify_events_problems(extras: dict[str, Any]) -> list[FieldProblem]:
    """`notify_events`: absent or null (the terminal states), else a non-empty list of distinct states from
    NOTIFY_STATES, and only with a `notify_url`."""
    events = extras.get("notify_events")
    if events is None:
        return []
    allowed = ", ".join(NOTIFY_STATES)
    if not isinstance(events, list) or not events:
        return [FieldProblem("notify_events", f"must be a non-empty list of states from {allowed} (default: "
                                              f"{', '.join(DEFAULT_NOTIFY_EVENTS)})")]
    problems = [FieldProblem(f"notify_events[{i}]", f"must be one of {allowed}")
                for i, e in enumerate(events) if not isinstance(e, str) or e not in NOTIFY_STATES]
    names = [e for e in events if isinstance(e, str)]
    if len(set(names)) != len(names):
        problems.append(FieldProblem("notify_events", "must not list a state twice"))
    if extras.get("notify_url") is None:
        problems.append(FieldProblem("notify_events", "needs notify_url: the states listed are POSTed there"))
    return problems


def idempotency_key_problem(key: str | None) -> FieldProblem | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        return FieldProblem("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters")
    return None


def accept_job(body: object, *, store: JobStore, enqueuer: Enqueuer, settings: Settings | ClientSettings,
               idempotency_key: str | None = None, app: str | None = None,
               max_active: int | None = None, request_id: str | None = None) -> Accepted:
    """Validate, store and queue one job; raises ValidationFailed (every problem), IdempotencyConflict, or
    AppBusy (the app has `max_active` jobs queued or in progress). The job belongs to `app` (see JobStore.create).

    `request_id` (the HTTP request's `X-Request-ID`) is recorded in the job's first event and sent with its submit
    message, so the worker's log lines for the submit carry it too.
    """
    request_limits = Limits(prompt_max_chars=settings.prompt_max_chars, model_names=settings.kling_models)
    result = validate_multi_image2video(body, limits=request_limits, extra_fields=EXTRA_FIELDS)
    problems = list(result.problems) + _extra_problems(result.extras, settings)
    key_problem = idempotency_key_problem(idempotency_key)
    if key_problem:
        problems.append(key_problem)
    if problems or result.request is None:
        raise ValidationFailed(tuple(problems))
    job, created = store.create(
        result.request,
        notify_url=result.extras.get("notify_url"),
        notify_events=result.extras.get("notify_events"),
        metadata=result.extras.get("metadata") or {},
        idempotency_key=idempotency_key,
        deadline_seconds=settings.job_deadline_seconds,
        due_in=settings.reconcile_quiet_seconds,
        app=app,
        max_active=max_active,
        request_id=request_id,
    )
    if created:
        log.info("job accepted", extra={"job_id": job.id, "app": app})
        try:
            enqueuer.submit(job.id, request_id=request_id)
        except Exception:  # the broker is down: the job is stored and due, the reconciler re-sends it
            log.exception("could not queue job; the reconciler will retry", extra={"job_id": job.id, "app": app})
    return Accepted(job=job, created=created)
