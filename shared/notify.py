"""Telling the world that a job finished: a Redis stream for consumers and Standard Webhooks POSTs.

The stream entry is written by whoever applied the terminal state step (so once per job); the webhook POST to a
job's `notify_url` is signed per the Standard Webhooks scheme: headers `webhook-id`, `webhook-timestamp` and
`webhook-signature` = `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with NOTIFY_SECRET
(a `whsec_<base64>` secret is base64-decoded first, as the scheme's libraries do).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis
import requests

from kling_relay.shared import http_client
from kling_relay.shared.settings import Secret
from kling_relay.shared.urlguard import UrlAllowlist, UrlRefused, UrlResolutionError, close_response, send_checked

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


def event_payload(job_public: dict[str, Any]) -> dict[str, Any]:
    """The body consumers get: the event type and the job as GET /v1/jobs/<id> shows it, without the timeline."""
    job = {k: v for k, v in job_public.items() if k != "events"}
    return {"type": f"job.{job['state']}", "timestamp": time.time(), "data": job}


def publish(client: redis.Redis, stream: str, job_public: dict[str, Any], *, maxlen: int = 100_000) -> str:
    """Append the finished job to the consumers' Redis stream (approximately capped); returns the entry id."""
    fields: dict[Any, Any] = {
        "job_id": job_public["id"],
        "state": job_public["state"],
        "payload": json.dumps(event_payload(job_public), separators=(",", ":"), sort_keys=True),
    }
    return str(client.xadd(stream, fields, maxlen=maxlen, approximate=True))


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
