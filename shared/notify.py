"""Telling the world about a job: the consumers' Redis stream and Standard Webhooks POSTs to `notify_url`.

The stream (`EVENTS_STREAM`, trimmed to about `EVENTS_STREAM_MAXLEN` entries, approximately) gets one entry per
terminal transition (`stored`, `failed`, `canceled`), with the fields `job_id`, `state`, `app`, `at` (when the job
entered the state, ISO-8601 UTC) and `payload` (JSON, `event_payload`). Delivery is at-least-once: the step
itself records, in the same Redis script, that it is to be announced (the store's outbox); whoever applied it
appends the entry and clears the record, and the reconciler announces whatever a crash or an outage left behind,
so an entry is never lost but may come twice. A retried job has one entry per terminal transition, e.g. `failed`
then `stored`. Consumers de-duplicate by `(job_id, state, at)`, or by `(job_id, state)` to keep only the first
time a job reached a state.

A job with a `notify_url` gets a POST for each state it asked for (`notify_events`, default the terminal ones),
queued through the same outbox when the step into that state is applied, and retried with back-off. It is signed
per the Standard Webhooks scheme: headers `webhook-id` (`msg_<job_id>_<state>`: the same for every delivery of
that state, so receivers de-duplicate by it), `webhook-timestamp` and `webhook-signature` =
`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with NOTIFY_SECRET (a `whsec_<base64>` secret is
base64-decoded first, as the scheme's libraries do).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import requests

from kling_relay.shared import http_client
from kling_relay.shared.jobs_model import TERMINAL, Job, Transition, iso_utc
from kling_relay.shared.settings import ClientSettings, Secret, Settings
from kling_relay.shared.urlguard import UrlAllowlist, UrlRefused, UrlResolutionError, close_response, send_checked

if TYPE_CHECKING:  # only for their types: both are handed in
    from kling_relay.shared.jobs import JobStore
    from kling_relay.shared.queue import Enqueuer

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 4096


class NotifyError(Exception):
    """Delivery failed; `retryable` says whether trying again later may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def secret_bytes(secret: Secret | str) -> bytes:
    """The HMAC key of NOTIFY_SECRET (see `kling_relay.shared.http_client.secret_bytes`)."""
    return http_client.secret_bytes(secret)


def sign(secret: Secret | str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` of one message; the one implementation is in `kling_relay.shared.http_client`."""
    return http_client.sign(secret, msg_id, timestamp, body)


def verify(secret: Secret | str, headers: Mapping[str, str], body: bytes | str, *, tolerance: int = 300,
           now: float | None = None) -> bool:
    """Check a Standard Webhooks signature (what a receiver does): `kling_relay.shared.http_client.verify`, which
    backend apps import without the relay's dependencies. `secret` is a plain string, `whsec_<base64>`, or a
    Secret."""
    return http_client.verify(secret, headers, body, tolerance=tolerance, now=now)


def event_payload(job_public: dict[str, Any], *, state: str | None = None, at: str | None = None) -> dict[str, Any]:
    """The body consumers get: `{"type": "job.<state>", "timestamp", "data"}`, per the Standard Webhooks payload.

    `data` is the job as GET /v1/jobs/<id> shows it, without the timeline. `state` (default: the job's) is the
    state the event is about and `at` (default: the job's `updated_at`) when the job entered it, ISO-8601 UTC; a
    notification sent later may carry a job that has moved on since (`data.state` then differs from `type`).
    """
    job = {k: v for k, v in job_public.items() if k != "events"}
    return {"type": f"job.{state or job['state']}", "timestamp": at or job["updated_at"], "data": job}


def publish(client: redis.Redis, stream: str, job_public: dict[str, Any], *, maxlen: int, state: str | None = None,
            at: str | None = None) -> str:
    """Append one terminal transition to the consumers' stream; returns the entry id.

    Fields: `job_id`, `state`, `app` (the app that created the job; empty without one, so a consumer can filter),
    `at` (ISO-8601 UTC) and `payload` (`event_payload`, JSON; its `data.app` too). `state` and `at` default
    to the job's own (`job_public` as the step left it: its `updated_at` is the transition's time). The stream is
    trimmed to about `maxlen` entries (approximate trimming: Redis may keep somewhat more).
    """
    payload = event_payload(job_public, state=state, at=at)
    fields: dict[Any, Any] = {
        "job_id": job_public["id"],
        "state": state or job_public["state"],
        "app": job_public.get("app") or "",
        "at": payload["timestamp"],
        "payload": json.dumps(payload, separators=(",", ":"), sort_keys=True),
    }
    return str(client.xadd(stream, fields, maxlen=maxlen, approximate=True))


@dataclass(frozen=True)
class EventsStream:
    """Where terminal transitions go: the stream's name (EVENTS_STREAM) and its length cap (EVENTS_STREAM_MAXLEN)."""

    name: str
    maxlen: int

    @classmethod
    def of(cls, settings: Settings | ClientSettings) -> EventsStream:
        return cls(settings.events_stream, settings.events_stream_maxlen)


def announce(store: JobStore, enqueuer: Enqueuer, job: Job, stream: EventsStream | None, *,
             transition: Transition | None = None) -> bool:
    """Announce one applied step: a terminal state goes to the stream, a state the job asked for is queued for
    its `notify_url`; then the step's outbox entry is removed. True when all of it was done.

    `job` is the job as the applied step returned it (not read again: a retry may have moved it on since), or,
    from the reconciler, as it is now with `transition` naming the step. Failures are logged and leave the outbox
    entry for the reconciler, which announces the step again (so a consumer may see it twice). `stream` may be
    None only for steps into non-terminal states (the stream records terminal ones only).
    """
    step = transition or Transition.of(job)
    to_stream = step.state in TERMINAL
    to_notify = job.wants_notification(step.state)
    if not (to_stream or to_notify):
        return True  # the step put nothing in the outbox
    done = True
    if to_stream:
        if stream is None:
            raise ValueError("a step into a terminal state needs the events stream to announce it")
        try:
            publish(store.redis, stream.name, job.public_dict(), maxlen=stream.maxlen, state=step.state.value,
                    at=iso_utc(step.at))
        except Exception:
            log.exception("could not publish the finished job", extra={"job_id": job.id, "state": step.state.value})
            done = False
    if to_notify:
        try:
            enqueuer.notify(job.id, step.state.value)
        except Exception:
            log.exception("could not queue the notification", extra={"job_id": job.id, "state": step.state.value})
            done = False
    if done:
        try:
            store.announced(step)
        except Exception:  # the reconciler announces it again: a duplicate, which consumers expect
            log.exception("could not clear the announced step", extra={"job_id": job.id})
    return done


def deliver(url: str, secret: Secret, msg_id: str, payload: dict[str, Any], *, session: requests.Session,
            allowlist: UrlAllowlist, timeout: tuple[float, float] = (5.0, 15.0)) -> int:
    """POST one signed event; 2xx → status, 4xx other than 408/429 → NotifyError(permanent), else retryable.

    The URL is the user's: it goes through the same SSRF guard as the video copy (`NOTIFY_URL_ALLOWLIST`, by
    default any public https host; private, loopback and link-local addresses refused after DNS resolution,
    connection pinned to the vetted address), no redirect is followed, and at most a few KiB of the answer is read.
    """
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "kling-relay",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    try:
        response = send_checked("POST", url, allowlist, session=session, timeout=timeout, headers=headers,
                                data=body, max_redirects=0)
    except UrlRefused as exc:
        raise NotifyError(f"notify_url refused: {exc.reason}", retryable=False) from exc
    except (requests.RequestException, UrlResolutionError) as exc:
        raise NotifyError(f"notify_url unreachable: {type(exc).__name__}", retryable=True) from exc
    try:
        status = response.status_code
        response.raw.read(MAX_ANSWER_BYTES, decode_content=False)  # drain a little; never a whole big body
    except Exception:  # noqa: S110 - the status is what counts; a broken body changes nothing
        pass
    finally:
        close_response(response)
    if 200 <= status < 300:
        return status
    retryable = status >= 500 or status in (408, 429)
    raise NotifyError(f"notify_url answered HTTP {status}", retryable=retryable)
