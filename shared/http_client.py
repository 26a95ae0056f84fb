"""HTTP client of kling-relay's `/v1` API, for backend apps: needs the relay's URL and an API token, nothing else.

    from kling_relay.shared.http_client import RelayClient, ValidationFailed

    client = RelayClient("https://relay.example.com", token="…")     # or RelayClient.from_env()
    job = client.submit(image_list=[{"image": "https://…/a.jpg"}], prompt="a sunrise", idempotency_key="order-42",
                        notify_url="https://app.example.com/hooks/kling", metadata={"order": 42})
    job = client.wait(job.id, timeout=900)       # until stored, failed or canceled
    jobs, cursor = client.list(state="failed", limit=50)
    client.cancel(job.id, reason="not needed")

Errors carry the API's answer: `ValidationFailed` (422, `.problems` lists every `{field, problem}`), `NotFound`
(404), `Conflict` (409, `.state` for an ops action), `Unauthorized` (401), `Forbidden` (403: an app token on an
operators' route), `Unavailable` (503/502/504/429 or the relay unreachable, `.retry_after`; `TooManyActiveJobs`, a
429 at submit: the app is at its APP_MAX_ACTIVE_JOBS cap), `BadRequest` (400, 413); all are `RelayError`
(`.status`, `.body`).

The token is an app's (API_TOKENS: the client sees and acts on that app's jobs only, another app's job is
`NotFound`) or an operator's (OPS_TOKENS: every job, `status()` and the resume calls).

Retries happen only where they are safe. GETs (and a submit with an idempotency key, which the relay replays
instead of duplicating) are retried on 502/503/504/429, timeouts and connection errors, with exponential back-off
and jitter, never sooner than the answer's `Retry-After`. A submit without a key, retry and cancel are retried only
when the connection could not be opened (nothing was sent). Every call has a connect and a read timeout.

`verify()` checks the Standard Webhooks signature of a notification the relay POSTed to a job's `notify_url`.

This module depends on the standard library and `requests` only (no celery, redis, boto3, Pillow or PyJWT),
and on nothing else of kling-relay: it can be copied into another code base as it is.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, Self
from urllib.parse import quote, urlsplit

import requests

__all__ = [
    "TERMINAL_STATES", "BadRequest", "Conflict", "FieldProblem", "Forbidden", "Job", "NotFound", "RelayClient",
    "RelayError", "RetryPolicy", "TooManyActiveJobs", "Unauthorized", "Unavailable", "ValidationFailed",
    "WaitTimedOut", "sign", "verify",
]

log = logging.getLogger("kling_relay.http_client")

STATES = ("queued", "submitted", "processing", "generated", "stored", "failed", "canceled")
TERMINAL_STATES = frozenset({"stored", "failed", "canceled"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_TIMEOUT = (5.0, 30.0)


# --- errors ------------------------------------------------------------------------------------------------------

class RelayError(Exception):
    """The relay refused or could not answer a call; `status` is the HTTP status (None: no answer), `body` the
    answer's JSON (None when it had none), `message` the API's own sentence (its `error` field) when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message = message
        self.status = status
        self.body = body


class BadRequest(RelayError):
    """400 (not JSON) or 413 (body too large), or another 4xx the other classes do not name."""


class Unauthorized(RelayError):
    """401: the token is missing or not one of the relay's API_TOKENS."""


class Forbidden(RelayError):
    """403: the route is for operators (OPS_TOKENS) and the token is an app's."""


class NotFound(RelayError):
    """404: no such job (or another app's: an app token sees its own jobs only)."""


class Conflict(RelayError):
    """409: an Idempotency-Key reused with another body, or an ops action the job's state does not allow
    (`state` is then the job's state, and `message` says why)."""

    @property
    def state(self) -> str | None:
        state = self.body.get("state") if isinstance(self.body, dict) else None
        return state if isinstance(state, str) else None


@dataclass(frozen=True)
class FieldProblem:
    """One problem of a refused request: `field` is a path such as `image_list[0].image`."""

    field: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


class ValidationFailed(RelayError):
    """422: the request is invalid; `problems` lists every `{field, problem}` the relay found. Nothing was stored."""

    def __init__(self, message: str, *, status: int | None = 422, body: Any = None) -> None:
        raw = body.get("fields") if isinstance(body, dict) else None
        self.problems: tuple[FieldProblem, ...] = tuple(
            FieldProblem(str(p.get("field", "")), str(p.get("problem", "")))
            for p in (raw if isinstance(raw, builtins.list) else []) if isinstance(p, dict))
        listed = "; ".join(f"{p.field}: {p.problem}" for p in self.problems)
        super().__init__(f"{message} ({listed})" if listed else message, status=status, body=body)


class Unavailable(RelayError):
    """The relay is unavailable for now: 503 (e.g. its Redis is restarting), 502/504 from a proxy, 429, or no
    answer at all (`status` None: connection refused or reset, timeout). `retry_after` is the answer's
    `Retry-After` in seconds, when it gave one. Trying again later may succeed; for a submit without an
    idempotency key after a timeout, the job may or may not have been created."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class TooManyActiveJobs(Unavailable):
    """429 at submit: the app already has APP_MAX_ACTIVE_JOBS jobs queued or in progress; nothing was stored.
    Never retried by the client (it would only wait): submit again after `retry_after` seconds, or once some of
    the app's jobs have finished."""


class WaitTimedOut(TimeoutError):
    """`wait()` gave up: the job was not finished within the timeout; `job` is the last view read (or None)."""

    def __init__(self, message: str, job: Job | None) -> None:
        super().__init__(message)
        self.job = job


# --- jobs ---------------------------------------------------------------------------------------------------------

def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Job:
    """A job as the API shows it. `state` is one of STATES; `error` (a failed job) is `{"reason", "code",
    "message"}`; `videos` are `{"bucket", "key", "sha256", "bytes", "duration"}`; `events` (the timeline) is None
    in listings, which leave it out. `units` / `balance_deduction`: what Kling billed for the job's task, None
    until Kling says. `app`: the app that created the job. `raw` is the JSON object as received."""

    id: str
    state: str
    kling_task_id: str | None
    created_at: datetime | None
    updated_at: datetime | None
    error: dict[str, Any] | None
    videos: builtins.list[dict[str, Any]]
    metadata: dict[str, Any]
    notify_url: str | None
    events: builtins.list[dict[str, Any]] | None
    units: float | None
    balance_deduction: float | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    app: str | None = None  # the app (its token's name) that created the job

    @property
    def finished(self) -> bool:
        """Stored, failed or canceled: the job will not change any more."""
        return self.state in TERMINAL_STATES

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        events = data.get("events")
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            state=str(data["state"]),
            kling_task_id=data.get("kling_task_id"),
            created_at=_parse_time(data.get("created_at")),
            updated_at=_parse_time(data.get("updated_at")),
            error=dict(error) if isinstance(error, dict) else None,
            videos=[dict(v) for v in data.get("videos") or [] if isinstance(v, dict)],
            metadata=dict(data.get("metadata") or {}),
            notify_url=data.get("notify_url"),
            events=[dict(e) for e in events if isinstance(e, dict)] if isinstance(events, builtins.list) else None,
            units=_amount(data.get("units")),
            balance_deduction=_amount(data.get("balance_deduction")),
            raw=data,
            app=data.get("app") if isinstance(data.get("app"), str) else None,
        )


def _amount(value: object) -> float | None:
    """A number from the API as a float; None for null or anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --- the client -----------------------------------------------------------------------------------------------------

def _retry_after(response: requests.Response) -> float | None:
    """`Retry-After` as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _not_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server: the connection was never opened (refused, DNS
    failure, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    from urllib3.exceptions import NewConnectionError  # requests' own dependency

    cause: Any = exc.args[0] if exc.args else None
    return isinstance(getattr(cause, "reason", cause), NewConnectionError)


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_for(response: requests.Response) -> RelayError:
    body = _json_or_none(response)
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = (response.reason or "error") if body is None else "error"
    status = response.status_code
    if status == 422:
        return ValidationFailed(message, status=status, body=body)
    if status == 401:
        return Unauthorized(message, status=status, body=body)
    if status == 403:
        return Forbidden(message, status=status, body=body)
    if status == 429 and isinstance(body, dict) and body.get("limit") == "APP_MAX_ACTIVE_JOBS":
        return TooManyActiveJobs(message, status=status, body=body, retry_after=_retry_after(response))
    if status == 404:
        return NotFound(message, status=status, body=body)
    if status == 409:
        return Conflict(message, status=status, body=body)
    if status in RETRY_STATUSES:
        return Unavailable(message, status=status, body=body, retry_after=_retry_after(response))
    if 400 <= status < 500:
        return BadRequest(message, status=status, body=body)
    return RelayError(message, status=status, body=body)


class SessionClient:
    """close() and `with` for an HTTP client over a `requests.Session`: the connections of a session the client made
    are closed; a session passed in stays open (its owner closes it). Also the Kling client's base."""

    _session: requests.Session
    _owns_session: bool

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RetryPolicy:
    """How a `RelayClient` retries (see its docstring): `retries` more tries, waits from `backoff` seconds doubling
    up to `max_backoff`, with jitter; a Retry-After above `max_retry_after` is not waited for."""

    retries: int
    backoff: float
    max_backoff: float
    max_retry_after: float

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.backoff * (2 ** attempt))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


class RelayClient(SessionClient):
    """One relay, one API token, one `requests.Session` (its connection pool is reused across calls).

    `timeout` is (connect, read) seconds for every request. `retries` is how many times a call that may be
    retried (see the module docstring) is tried again; the wait before each retry grows from `backoff` seconds,
    doubling up to `max_backoff`, with jitter, and is never shorter than the answer's Retry-After. An answer
    asking to wait more than `max_retry_after` seconds is not waited for: the call raises `Unavailable` with it.

    The token is never logged, and repr() does not show it.
    """

    def __init__(self, base_url: str, token: str, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                 retries: int = 3, backoff: float = 0.5, max_backoff: float = 10.0, max_retry_after: float = 60.0,
                 session: requests.Session | None = None, user_agent: str = "kling-relay-client") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http(s) URL with a host, e.g. https://relay.example.com")
        if not token:
            raise ValueError("token must be one of the relay's API_TOKENS")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.retry_policy = RetryPolicy(retries, backoff, max_backoff, max_retry_after)
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._user_agent = user_agent

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **options: Any) -> RelayClient:
        """A client from KLING_RELAY_URL (the relay's base URL) and KLING_RELAY_TOKEN (one of its API_TOKENS), or
        KLING_RELAY_TOKEN_FILE (a file holding the token); `options` go to the constructor. ValueError naming
        what is missing."""
        env = os.environ if env is None else env
        url = (env.get("KLING_RELAY_URL") or "").strip()
        token = (env.get("KLING_RELAY_TOKEN") or "").strip()
        token_file = (env.get("KLING_RELAY_TOKEN_FILE") or "").strip()
        if token_file and not token:
            try:
                with open(token_file, encoding="utf-8") as fh:
                    token = fh.read().strip()
            except OSError as exc:
                raise ValueError(f"cannot read KLING_RELAY_TOKEN_FILE {token_file!r}: {exc.strerror}") from None
        missing = [name for name, value in (("KLING_RELAY_URL", url), ("KLING_RELAY_TOKEN", token)) if not value]
        if missing:
            raise ValueError(f"set {' and '.join(missing)} (the relay's URL and one of its API tokens; "
                             "KLING_RELAY_TOKEN_FILE may name a file holding the token)")
        return cls(url, token, **options)

    def __repr__(self) -> str:
        return f"RelayClient(base_url={self.base_url!r})"

    # --- transport ---------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None,
              headers: Mapping[str, str] | None = None, safe: bool, retries: int | None = None) -> requests.Response:
        """One call with the retries allowed: `safe` calls on transient answers and failures, the others only
        when nothing was sent. Returns a 2xx answer; raises the RelayError of any other."""
        url = self.base_url + path
        all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                       "User-Agent": self._user_agent, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            all_headers["Content-Type"] = "application/json"
        limit = self.retry_policy.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                response = self._session.request(method, url, params=params, data=data, headers=all_headers,
                                                 timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                retryable = isinstance(exc, (requests.ConnectionError, requests.Timeout))
                if retryable and attempt < limit and (safe or _not_sent(exc)):
                    delay = self.retry_policy.delay(attempt)
                    log.warning("relay call failed, retrying", extra={"method": method, "path": path,
                                                                      "error": type(exc).__name__,
                                                                      "attempt": attempt + 1, "delay": delay})
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise Unavailable(f"relay unreachable: {type(exc).__name__}") from exc
            if 200 <= response.status_code < 300:
                return response
            error = _error_for(response)
            response.close()
            if isinstance(error, Unavailable) and not isinstance(error, TooManyActiveJobs) and safe and \
                    attempt < limit:
                delay = max(self.retry_policy.delay(attempt), error.retry_after or 0.0)
                if delay <= self.retry_policy.max_retry_after:
                    log.warning("relay unavailable, retrying", extra={"method": method, "path": path,
                                                                      "status": error.status,
                                                                      "attempt": attempt + 1, "delay": delay})
                    time.sleep(delay)
                    attempt += 1
                    continue
            raise error

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        body = _json_or_none(response)
        if body is None:
            raise RelayError("the relay's answer is not JSON", status=response.status_code)
        return body

    @staticmethod
    def _job_path(job_id: str) -> str:
        if not job_id:
            raise ValueError("job_id must not be empty")
        return "/v1/jobs/" + quote(job_id, safe="")

    # --- jobs ----------------------------------------------------------------------------------------------------
    def submit(self, *, image_list: builtins.list[dict[str, str]], prompt: str, idempotency_key: str | None = None,
               notify_url: str | None = None, metadata: Mapping[str, Any] | None = None, **fields: Any) -> Job:
        """POST /v1/jobs: queue one job; `fields` are the other body fields (model_name, negative_prompt, mode,
        duration, aspect_ratio). With `idempotency_key` (≤ 255 printable characters) the call is retried on
        transient failures and the relay returns the same job for the same key and body (`Conflict` for another
        body). Raises `ValidationFailed` listing every problem; nothing is stored then."""
        body: dict[str, Any] = {"image_list": image_list, "prompt": prompt, **fields}
        if notify_url is not None:
            body["notify_url"] = notify_url
        if metadata is not None:
            body["metadata"] = dict(metadata)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return Job.from_dict(self._call("POST", "/v1/jobs", body=body, headers=headers,
                                        safe=idempotency_key is not None))

    def get(self, job_id: str) -> Job:
        """GET /v1/jobs/<id>: the job with its timeline (`events`); `NotFound` for an unknown id."""
        return Job.from_dict(self._call("GET", self._job_path(job_id), safe=True))

    def list(self, *, state: str | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[builtins.list[Job], str | None]:
        """GET /v1/jobs: one page, newest first, all jobs or one state's; `(jobs, next_cursor)`, next_cursor None
        on the last page. `limit` 1–200. The jobs have no `events` (get() has them)."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state
        if cursor is not None:
            params["cursor"] = cursor
        page = self._call("GET", "/v1/jobs", params=params, safe=True)
        next_cursor = page.get("next_cursor")
        return [Job.from_dict(j) for j in page.get("jobs") or []], next_cursor if isinstance(next_cursor, str) else None

    def iter_jobs(self, *, state: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (or every job in `state`), newest first, fetching page after page as it is consumed."""
        cursor: str | None = None
        while True:
            jobs, cursor = self.list(state=state, limit=page_size, cursor=cursor)
            yield from jobs
            if cursor is None:
                return

    def _action(self, job_id: str, action: str, reason: str | None) -> Job:
        body = {"reason": reason} if reason else None
        return Job.from_dict(self._call("POST", f"{self._job_path(job_id)}/{action}", body=body, safe=False))

    def retry(self, job_id: str, *, reason: str | None = None) -> Job:
        """POST /v1/jobs/<id>/retry: put a failed job back to work; the job now. `Conflict` (`.message` says why)
        when it may not be retried (e.g. Kling's task failed: send the request again as a new job); `NotFound`."""
        return self._action(job_id, "retry", reason)

    def cancel(self, job_id: str, *, reason: str | None = None) -> Job:
        """POST /v1/jobs/<id>/cancel: a queued, submitted, processing or generated job becomes canceled (a task
        already made at Kling still runs there, its outcome ignored); `Conflict` for a finished job; `NotFound`."""
        return self._action(job_id, "cancel", reason)

    def wait(self, job_id: str, *, timeout: float = 900.0, poll: float = 1.0, max_poll: float = 10.0,
             on_change: Callable[[Job], None] | None = None) -> Job:
        """Poll GET /v1/jobs/<id> until the job is stored, failed or canceled, and return it.

        The pause between polls starts at `poll` seconds and grows by half each time up to `max_poll`, back to
        `poll` whenever the state changes. While the relay is unavailable (503 and the like, or unreachable) the
        wait goes on, pausing at least as long as its Retry-After asks. `on_change(job)` is called on each new
        state. Raises `WaitTimedOut` (a TimeoutError, with the last `job` read) after `timeout` seconds,
        `NotFound` for an unknown id, and the other errors as they come.
        """
        deadline = time.monotonic() + timeout
        interval = poll
        last: Job | None = None
        while True:
            try:
                job = Job.from_dict(self._call("GET", self._job_path(job_id), safe=True, retries=0))
            except Unavailable as exc:
                delay = max(interval, exc.retry_after or 0.0)
                log.warning("relay unavailable while waiting", extra={"job_id": job_id, "status": exc.status,
                                                                      "delay": delay})
            else:
                if last is None or job.state != last.state:
                    interval = poll
                    if on_change is not None:
                        on_change(job)
                last = job
                if job.finished:
                    return job
                delay = interval
            interval = min(max_poll, interval * 1.5)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                where = f"still {last.state}" if last is not None else "the relay did not answer"
                raise WaitTimedOut(f"job {job_id}: {where} after {timeout}s", last)
            time.sleep(min(delay, remaining))

    # --- submission ------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """GET /v1/status (operators only: `Forbidden` for an app token): `{"submission": "open"|"paused", "pause",
        "in_flight", "copy": "open"|"paused",
        "copy_pause", "copy_waiting": {"count", "jobs"}, "jobs": {state: count}}`."""
        result: dict[str, Any] = self._call("GET", "/v1/status", safe=True)
        return result

    def resume_submission(self) -> dict[str, Any]:
        """POST /v1/submission/resume (operators only): clear a pause once the account or keys are fixed;
        `{"resumed": bool, "pause": <the pause cleared> | None}`."""
        result: dict[str, Any] = self._call("POST", "/v1/submission/resume", safe=False)
        return result

    def resume_copy(self) -> dict[str, Any]:
        """POST /v1/copy/resume (operators only): clear a copy pause once the bucket, credentials or policy are fixed;
        `{"resumed": bool, "pause": <the pause cleared> | None}`."""
        result: dict[str, Any] = self._call("POST", "/v1/copy/resume", safe=False)
        return result


# --- notifications (Standard Webhooks) ----------------------------------------------------------------------------

class _Revealing(Protocol):
    def reveal(self) -> str: ...


def secret_bytes(secret: str | _Revealing) -> bytes:
    """The HMAC key of a signing secret: a `whsec_<base64>` secret is base64-decoded (as the Standard Webhooks
    libraries do), any other string is used as its UTF-8 bytes. ValueError for a `whsec_` secret that is not
    base64."""
    raw = secret if isinstance(secret, str) else secret.reveal()
    if raw.startswith("whsec_"):
        try:
            return base64.b64decode(raw[len("whsec_"):])
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return raw.encode()


def sign(secret: str | _Revealing, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "<msg_id>.<timestamp>.<body>">`: the `webhook-signature` of one message."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str | _Revealing, headers: Mapping[str, str], body: bytes | str, *, tolerance: int = 300,
           now: float | None = None) -> bool:
    """Check a notification the relay POSTed (Standard Webhooks): True when one of the `webhook-signature`
    entries is the HMAC of `webhook-id`, `webhook-timestamp` and the raw `body` under `secret` (NOTIFY_SECRET:
    a plain string, or `whsec_<base64>`), and the timestamp is within `tolerance` seconds of `now` (default: the
    clock). Header names are matched in any case; pass the body exactly as received, before any JSON parsing.
    """
    lower = {str(k).lower(): v for k, v in headers.items()}
    try:
        msg_id = lower["webhook-id"]
        stamp = lower["webhook-timestamp"].strip()
        signatures = lower["webhook-signature"].split()
    except (KeyError, AttributeError):
        return False
    if not (stamp.isascii() and stamp.isdigit()):
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body.encode() if isinstance(body, str) else body)
    return any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures)
