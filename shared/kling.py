"""Client for Kling's multi-image-to-video API, with errors that say whether a retry is safe.

One :class:`KlingClient` holds one ``requests.Session`` (a connection pool, safe to share between
threads for these calls), sends every request with a connect and read timeout, and turns every
answer into either a :class:`KlingTask` or a :class:`KlingError` subclass:

=====================  =========================================================================
``KlingRetryLater``    1302, 1303, 5000-5002, timeouts and connection errors: send it again later
``KlingFixRequest``    1200-1202, 1300, 1301: the request itself is wrong; do not resend it as is
``KlingTaskNotFound``  1203 (a ``KlingFixRequest`` with kind ``NOT_FOUND``): no such task
``KlingFixAccount``    1000-1004, 1100-1103, 1304: keys, balance or permissions need a human
``KlingAmbiguous``     a create whose outcome is unknown (timeout or lost connection after sending,
                       a 5xx answer): the task may exist, look it up by ``external_task_id`` first
``KlingLookupIncomplete`` a lookup by ``external_task_id`` that hit its bound before the end of the task
                       list (a ``KlingRetryLater``): the task may exist, never "not found"
``KlingProtocolError`` an answer that is not a Kling envelope (wrong base URL, a proxy's page)
=====================  =========================================================================

An unknown non-zero code is classed by HTTP status: 5xx retry later, anything else fix request.
The envelope's ``code`` decides success, whatever the HTTP status. Secrets (keys, tokens) never
appear in reprs, error strings or log lines.

Every string taken from Kling (a task, a callback, an error envelope) can be stored as UTF-8: JSON may carry a
lone UTF-16 surrogate (``"\\ud800"``), which no store can encode. Ids that have one are refused (ValueError /
KlingProtocolError: they could never be looked up again); free text (``task_status_msg``, messages, video
URLs and durations) has each one replaced by U+FFFD.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal, cast
from urllib.parse import parse_qs, quote, urlsplit

import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from kling_relay.shared import http_session, metrics
from kling_relay.shared.http_client import SessionClient
from kling_relay.shared.inputs import has_lone_surrogate, replaced_text
from kling_relay.shared.kling_auth import DEFAULT_RENEW_MARGIN_S, JwtTokenSource, StaticApiKey, TokenSource
from kling_relay.shared.kling_codes import LOOKUP_FALLBACK_CODES, TOKEN_EXPIRED, Handling, handling

log = logging.getLogger(__name__)

TaskStatus = Literal["submitted", "processing", "succeed", "failed"]
TASK_STATUSES: tuple[TaskStatus, ...] = ("submitted", "processing", "succeed", "failed")

MULTI_IMAGE2VIDEO_PATH = "/v1/videos/multi-image2video"
#: Largest page Kling serves (pageSize 1-500), used when scanning for an external_task_id.
MAX_PAGE_SIZE = 500
MAX_PAGE_NUM = 1000
#: Pages of 500 a lookup by external_task_id reads at most (50,000 tasks) unless told otherwise.
DEFAULT_LOOKUP_MAX_PAGES = 100
#: An answer bigger than this is not a Kling envelope (a list page of 500 tasks is well under 1 MiB).
MAX_BODY_BYTES = 16 * 1024 * 1024
_MAX_MESSAGE_CHARS = 500


# --------------------------------------------------------------------------------------------- errors

class ErrorKind(StrEnum):
    """What a caller should do about a failed call."""

    RETRY_LATER = "retry_later"
    FIX_REQUEST = "fix_request"
    NOT_FOUND = "not_found"
    FIX_ACCOUNT = "fix_account"
    AMBIGUOUS = "ambiguous"
    PROTOCOL = "protocol"


class KlingError(Exception):
    """A failed Kling call: the server's ``code``/``message``/``request_id`` if it answered one.

    ``http_status`` is None when no HTTP answer arrived; ``cause`` is the underlying exception, if any.
    """

    kind: ClassVar[ErrorKind] = ErrorKind.PROTOCOL

    def __init__(self, message: str, *, http_status: int | None = None, code: int | None = None,
                 request_id: str | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.request_id = request_id
        self.cause = cause

    @property
    def retryable(self) -> bool:
        """True when the very same request may simply be sent again later."""
        return self.kind is ErrorKind.RETRY_LATER

    def __str__(self) -> str:
        where = [f"code {self.code}" if self.code is not None else "no code",
                 f"HTTP {self.http_status}" if self.http_status is not None else "no HTTP answer"]
        if self.request_id:
            where.append(f"request_id {self.request_id}")
        return f"Kling {self.kind.value} ({', '.join(where)}): {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with keyword-only fields; the cause may hold unpicklable transport objects.
        state = {k: v for k, v in self.__dict__.items() if k != "cause"}
        return (type(self), (self.message,), state)


class KlingProtocolError(KlingError):
    """The answer was not a Kling envelope, or its data was malformed (usually a wrong base URL)."""

    kind = ErrorKind.PROTOCOL


class KlingRetryLater(KlingError):
    """Nothing happened on Kling's side that matters: the same request can be sent again later."""

    kind = ErrorKind.RETRY_LATER


class KlingLookupIncomplete(KlingRetryLater):
    """A lookup by external_task_id read as many list pages as it may without reaching the list's end.

    The task may be on a page not read: this is never "not found" (which would allow a second, billed create).
    """


class KlingFixRequest(KlingError):
    """Kling rejected the request itself (parameters, content policy): resending it will fail again."""

    kind = ErrorKind.FIX_REQUEST


class KlingTaskNotFound(KlingFixRequest):
    """No such task (code 1203, or no task carries the external_task_id asked for)."""

    kind = ErrorKind.NOT_FOUND


class KlingFixAccount(KlingError):
    """Credentials, balance, permissions or IP allow-list need a human; pause instead of retrying."""

    kind = ErrorKind.FIX_ACCOUNT


class KlingAmbiguous(KlingError):
    """A create whose outcome is unknown: the task may exist (and be billed).

    Look it up by ``external_task_id`` before creating it again. ``cause`` holds what went wrong:
    the transport exception, or the server error answered after the request was sent.
    """

    kind = ErrorKind.AMBIGUOUS


_CLASS_FOR_KIND: dict[ErrorKind, type[KlingError]] = {
    cls.kind: cls for cls in (KlingProtocolError, KlingRetryLater, KlingFixRequest, KlingTaskNotFound,
                              KlingFixAccount, KlingAmbiguous)
}


_KIND_FOR_HANDLING: dict[Handling, ErrorKind] = {
    Handling.RETRY: ErrorKind.RETRY_LATER,
    Handling.THROTTLE: ErrorKind.RETRY_LATER,
    Handling.REJECT: ErrorKind.FIX_REQUEST,
    Handling.NOT_FOUND: ErrorKind.NOT_FOUND,
    Handling.PAUSE_AUTH: ErrorKind.FIX_ACCOUNT,
    Handling.PAUSE_ACCOUNT: ErrorKind.FIX_ACCOUNT,
}


def kind_for_code(code: int, http_status: int | None) -> ErrorKind:
    """The kind of a non-zero Kling ``code`` (the table in `kling_codes`); unknown codes go by HTTP status."""
    return _KIND_FOR_HANDLING[handling(code, http_status)]


def error_for(kind: ErrorKind, message: str, **fields: Any) -> KlingError:
    """An instance of the error class for ``kind``."""
    return _CLASS_FOR_KIND[kind](message, **fields)


# ---------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class KlingVideo:
    """One generated video; ``url`` is temporary (Kling clears results after about 30 days).

    ``watermark_url``: the watermarked copy Kling adds when the create asked ``watermark_info: {"enabled": true}``
    (None otherwise, or when Kling sent none or something that is not a non-empty string: an odd optional field
    never makes the task, and so the billed video, unreadable).
    """

    id: str
    url: str
    duration: str
    watermark_url: str | None = None


@dataclass(frozen=True)
class KlingTask:
    """A Kling task as returned by create/query/list and posted to callbacks."""

    task_id: str
    status: TaskStatus
    status_msg: str = ""
    external_task_id: str | None = None
    created_at_ms: int | None = None
    updated_at_ms: int | None = None
    videos: tuple[KlingVideo, ...] = ()
    #: Units Kling billed for the task (`final_unit_deduction`, on finished tasks), None when absent or unreadable.
    final_unit_deduction: float | None = None
    #: Balance Kling deducted (`final_balance_deduction`, which some callbacks carry), None when absent/unreadable.
    final_balance_deduction: float | None = None

    @property
    def is_final(self) -> bool:
        """True once the task succeeded or failed: its status will not change any more."""
        return self.status in ("succeed", "failed")

    @classmethod
    def from_json(cls, obj: object) -> KlingTask:
        """Parse a task object; raise ValueError naming the field if it is malformed.

        Required: ``task_id`` (non-empty string) and ``task_status`` (one of the four statuses).
        Optional fields may be missing or null, but when present they must have the documented type; the billing
        fields (``final_unit_deduction``, ``final_balance_deduction``: a string such as ``"1"``, or a number) are
        the exception: one that is not a finite number >= 0 is read as None rather than refusing the task, whose
        status matters more than its bill.
        """
        if type(obj) is not dict and not isinstance(obj, Mapping):  # (a dict, as parsed, skips the ABC's check)
            raise ValueError(f"a Kling task must be a JSON object, not {type(obj).__name__}")
        task_id = obj.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("task_id must be a non-empty string")
        if has_lone_surrogate(task_id):
            raise ValueError("task_id must be valid Unicode (it has a lone surrogate)")
        status = obj.get("task_status")
        if status not in TASK_STATUSES:
            raise ValueError(f"task_status must be one of {', '.join(TASK_STATUSES)}, not {status!r}")
        info = _optional(obj, "task_info", Mapping) or {}
        result = _optional(obj, "task_result", Mapping) or {}
        videos = _optional(result, "videos", list) or []
        return cls(
            task_id=task_id,
            status=cast(TaskStatus, status),
            status_msg=replaced_text(_optional(obj, "task_status_msg", str) or ""),
            external_task_id=_safe_or_none(_optional(info, "external_task_id", str)),
            created_at_ms=_timestamp(obj, "created_at"),
            updated_at_ms=_timestamp(obj, "updated_at"),
            videos=tuple(_video(v, i) for i, v in enumerate(videos)),
            final_unit_deduction=_deduction(obj, "final_unit_deduction", task_id),
            final_balance_deduction=_deduction(obj, "final_balance_deduction", task_id),
        )


#: The type json.loads gives each kind `_optional` checks: matched first, without the ABC's slower isinstance.
_PARSED: dict[type[Any], type[Any]] = {Mapping: dict, list: list, str: str}


def _safe_or_none(text: str | None) -> str | None:
    return None if text is None else replaced_text(text)


def _optional(obj: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    value = obj.get(key)
    if value is not None and type(value) is not _PARSED.get(kind) and not isinstance(value, kind):
        raise ValueError(f"{key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _timestamp(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number of milliseconds, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number of milliseconds")
    return int(value)


def _deduction(obj: Mapping[str, Any], key: str, task_id: str) -> float | None:
    """A billing amount as a float: a string ("1", "0.5") or a number, finite and >= 0; None when absent or not."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    amount: float | None = None
    if isinstance(value, str) and len(value) <= 32:
        try:
            amount = float(value.strip())
        except ValueError:
            amount = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            amount = float(value)
        except OverflowError:  # an int too large for a float
            amount = None
    if amount is None or not math.isfinite(amount) or amount < 0:
        log.warning("unreadable billing field in a Kling task, ignored", extra={"field": key, "task_id": task_id})
        return None
    return amount


def _video(obj: object, index: int) -> KlingVideo:
    if not isinstance(obj, Mapping):
        raise ValueError(f"task_result.videos[{index}] must be an object")
    url, vid, duration = obj.get("url"), obj.get("id"), obj.get("duration")
    if not isinstance(url, str) or not url:
        raise ValueError(f"task_result.videos[{index}].url must be a non-empty string")
    if isinstance(vid, bool) or not isinstance(vid, str | int | None):
        raise ValueError(f"task_result.videos[{index}].id must be a string")
    if isinstance(duration, bool) or not isinstance(duration, str | int | float | None):
        raise ValueError(f"task_result.videos[{index}].duration must be a string")
    watermark = obj.get("watermark_url")
    return KlingVideo(id="" if vid is None else replaced_text(str(vid)), url=replaced_text(url),
                      duration="" if duration is None else replaced_text(str(duration)),
                      watermark_url=replaced_text(watermark) if isinstance(watermark, str) and watermark else None)


# --------------------------------------------------------------------------------------------- client

@dataclass(frozen=True)
class _Envelope:
    code: int
    message: str
    request_id: str | None
    data: Any


@dataclass(frozen=True)
class _Answer:
    """The ``data`` of a success envelope, with what identifies the answer in errors."""

    data: Any
    http_status: int
    request_id: str | None


class KlingClient(SessionClient):
    """Talks to ``<base_url>/v1/videos/multi-image2video``; ``base_url`` may carry a reseller's prefix.

    Auth is either ``access_key`` + ``secret_key`` (a cached HS256 JWT, renewed ``jwt_renew_margin``
    seconds before it expires and once more if Kling answers 1004 "token expired"; "legacy" in Kling's newer
    docs) or ``api_key`` (a static Bearer key: an official API key, or a reseller's). ``timeout`` is
    (connect, read) seconds, or one number for both. A ``session`` passed in is used as is and not closed by
    :meth:`close`. ``lookup_max_pages`` bounds the list pages (of 500) that :meth:`get_task_by_external_id`
    reads (1-1000, Kling's own limit).
    """

    def __init__(self, base_url: str, *, access_key: str | None = None, secret_key: str | None = None,
                 api_key: str | None = None, timeout: float | tuple[float, float] = (5.0, 30.0),
                 session: requests.Session | None = None, clock: Callable[[], float] = time.time,
                 jwt_renew_margin: float = DEFAULT_RENEW_MARGIN_S,
                 lookup_max_pages: int = DEFAULT_LOOKUP_MAX_PAGES) -> None:
        parts = urlsplit(base_url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
                or "@" in parts.netloc):
            # (credentials in the URL would make requests send Basic auth instead of our Bearer header)
            raise ValueError("base_url must be an http(s) URL without credentials, query or fragment, "
                             "e.g. https://api-singapore.klingai.com or https://host/kling")
        self._base_url = base_url.rstrip("/")
        self._auth = _auth_from(access_key, secret_key, api_key, clock, jwt_renew_margin)
        self._timeout = _check_timeout(timeout)
        self._lookup_max_pages = _check_max_pages(lookup_max_pages)
        self._owns_session = session is None
        self._session = session if session is not None else http_session.Session()

    def __repr__(self) -> str:
        return f"KlingClient(base_url={self._base_url!r}, auth={self._auth.mode!r})"

    __str__ = __repr__

    # -- calls

    def create_multi_image2video(self, body: Mapping[str, Any]) -> KlingTask:
        """Create a task from a request body in Kling's field names (sent as given, not validated here).

        Raises KlingAmbiguous when the outcome is unknown (timeout or lost connection after sending,
        a 5xx answer, or a success answer that cannot be read): look the task up by external_task_id.
        A connection that failed before the request went out is KlingRetryLater.
        """
        answer = self._call("POST", MULTI_IMAGE2VIDEO_PATH, json_body=dict(body), create=True)
        return _task_from(answer, KlingAmbiguous, "create answered success but its task is malformed")

    def get_task(self, task_id: str) -> KlingTask:
        """The task with this task_id; KlingTaskNotFound if Kling does not know it."""
        return _task_from(self._call("GET", f"{MULTI_IMAGE2VIDEO_PATH}/{_path_segment(task_id, 'task_id')}"))

    def list_tasks(self, page_num: int = 1, page_size: int = 30) -> list[KlingTask]:
        """One page of this account's tasks (pageNum 1-1000, pageSize 1-500), in Kling's order, which the docs
        do not state: never assume newest first."""
        if not 1 <= page_num <= MAX_PAGE_NUM or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_num must be 1-{MAX_PAGE_NUM} and page_size 1-{MAX_PAGE_SIZE}")
        answer = self._call("GET", MULTI_IMAGE2VIDEO_PATH, params={"pageNum": page_num, "pageSize": page_size})
        if answer.data is None:
            return []
        if not isinstance(answer.data, list):
            raise KlingProtocolError(f"task list must be a JSON array, not {type(answer.data).__name__}",
                                     http_status=answer.http_status, request_id=answer.request_id)
        return [_task_from(_Answer(item, answer.http_status, answer.request_id)) for item in answer.data]

    def get_task_by_external_id(self, external_task_id: str, *, max_pages: int | None = None) -> KlingTask:
        """The task created with this external_task_id, robust to either reading of Kling's docs.

        Kling says a task can be looked up by its external_task_id but not whether in the task_id
        path slot. So first ``GET .../multi-image2video/{external_task_id}``, accepted only if the
        returned task really carries that external_task_id (an id could also match another task's
        task_id). If that answers something else, 1200-1203, or a 4xx that is not a Kling envelope (a
        gateway's own page), scan the task list in pages of 500 from the first, whatever its order (the docs
        state none), until the task is found or a page comes back short (the list's end).

        Raises KlingTaskNotFound only after reading the whole list. When ``max_pages`` (default: the client's
        ``lookup_max_pages``) full pages were read without reaching the end, raises KlingLookupIncomplete: the
        task may be further on, so this is never "not found". Other errors (retry later, account, a list that
        is not a Kling envelope, ...) propagate as they are.
        """
        segment = _path_segment(external_task_id, "external_task_id")
        bound = self._lookup_max_pages if max_pages is None else _check_max_pages(max_pages)
        try:
            task = _task_from(self._call("GET", f"{MULTI_IMAGE2VIDEO_PATH}/{segment}"))
            if task.external_task_id == external_task_id:
                return task
        except (KlingFixRequest, KlingProtocolError) as err:
            # Any "I don't understand this id here" answer (a Kling 12xx code, or a gateway's plain 4xx page)
            # falls back to the list; a retry-later or account error propagates.
            if isinstance(err, KlingFixRequest) and err.code not in LOOKUP_FALLBACK_CODES:
                raise
            if isinstance(err, KlingProtocolError) and not (err.http_status and 400 <= err.http_status < 500):
                raise
        scanned = 0
        for page_num in range(1, bound + 1):
            page = self.list_tasks(page_num=page_num, page_size=MAX_PAGE_SIZE)
            scanned += len(page)
            for task in page:
                if task.external_task_id == external_task_id:
                    return task
            if len(page) < MAX_PAGE_SIZE:
                raise KlingTaskNotFound(f"no task with external_task_id {external_task_id!r} "
                                        f"(direct lookup, then the whole list: {scanned} tasks)")
        raise KlingLookupIncomplete(
            f"lookup of external_task_id {external_task_id!r} stopped after {bound} full pages ({scanned} tasks) "
            f"without reaching the end of the task list: the task may exist further on")

    # -- transport

    def _call(self, method: str, path: str, *, params: Mapping[str, int] | None = None,
              json_body: dict[str, Any] | None = None, create: bool = False) -> _Answer:
        """Send one call and return the success envelope's data; retries once on 1004 with a fresh JWT."""
        token = self._auth.token()
        try:
            return self._send(method, path, token, params=params, json_body=json_body, create=create)
        except KlingFixAccount as err:
            if err.code != TOKEN_EXPIRED or self._auth.mode != "jwt":
                raise
            log.info("kling token expired, renewing once", extra={"path": path, "request_id": err.request_id})
            token = self._auth.renew(token)
            return self._send(method, path, token, params=params, json_body=json_body, create=create)

    def _send(self, method: str, path: str, token: str, *, params: Mapping[str, int] | None,
              json_body: dict[str, Any] | None, create: bool) -> _Answer:
        started = time.monotonic()
        try:
            response = self._session.request(
                method, self._base_url + path, params=params, json=json_body, timeout=self._timeout,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                allow_redirects=False, stream=True)
            try:
                status, raw = response.status_code, _read_capped(response)
            finally:
                response.close()
        except requests.RequestException as exc:
            error = _transport_error(exc, method, path, create, (token, *_body_secrets(json_body)))
            _log_outcome(method, path, started, error)
            raise error from exc
        envelope = _parse_envelope(raw)
        if envelope is not None and envelope.code == 0:
            _log_outcome(method, path, started, None, status=status, request_id=envelope.request_id)
            return _Answer(envelope.data, status, envelope.request_id)
        error = _answer_error(status, raw, envelope, create, (token, *_body_secrets(json_body)))
        _log_outcome(method, path, started, error)
        raise error


def _auth_from(access_key: str | None, secret_key: str | None, api_key: str | None,
               clock: Callable[[], float], renew_margin: float) -> TokenSource:
    if api_key is not None and access_key is None and secret_key is None:
        return StaticApiKey(api_key)
    if api_key is None and access_key is not None and secret_key is not None:
        return JwtTokenSource(access_key, secret_key, clock=clock, renew_margin=renew_margin)
    raise ValueError("give either access_key and secret_key, or api_key (exactly one auth mode)")


def _check_timeout(timeout: float | tuple[float, float]) -> tuple[float, float]:
    pair = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    if len(pair) != 2 or not all(isinstance(t, int | float) and t > 0 for t in pair):
        raise ValueError("timeout must be a positive number or a (connect, read) pair of them")
    return (float(pair[0]), float(pair[1]))


def _check_max_pages(pages: int) -> int:
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= MAX_PAGE_NUM:
        raise ValueError(f"max_pages must be a whole number from 1 to {MAX_PAGE_NUM} (Kling's pageNum limit)")
    return pages


def _path_segment(value: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return quote(value, safe="")


def _read_capped(response: requests.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_envelope(raw: bytes) -> _Envelope | None:
    """The envelope in ``raw``, or None if it is not one (not JSON, not an object, no integer code)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    code = obj.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    message, request_id = obj.get("message"), obj.get("request_id")
    return _Envelope(code=code, message=replaced_text(message) if isinstance(message, str) else "",
                     request_id=replaced_text(request_id) if isinstance(request_id, str) and request_id else None,
                     data=obj.get("data"))


def _body_secrets(json_body: Mapping[str, Any] | None) -> tuple[str, ...]:
    """What of a request body must never come back in an error: the callback URL carries a per-job token."""
    url = (json_body or {}).get("callback_url")
    if not isinstance(url, str) or not url:
        return ()
    token = parse_qs(urlsplit(url).query).get("token", [""])[0]
    return (url, token) if token else (url,)


def _answer_error(status: int, raw: bytes, envelope: _Envelope | None, create: bool,
                  secrets: tuple[str, ...]) -> KlingError:
    """The error for an HTTP answer that is not a success envelope."""
    if envelope is None:
        snippet = raw[:200].decode("utf-8", "replace")
        message = _scrub(f"HTTP {status} answer is not a Kling envelope: {snippet!r}", *secrets)
        if status >= 500:
            kind = ErrorKind.RETRY_LATER
        elif create and 200 <= status < 300:
            kind = ErrorKind.AMBIGUOUS  # the server accepted the create; the task may well exist
        else:
            kind = ErrorKind.PROTOCOL
        error = error_for(kind, message, http_status=status)
    else:
        kind = kind_for_code(envelope.code, status)
        error = error_for(kind, _scrub(envelope.message or "(no message)", *secrets), http_status=status,
                          code=envelope.code, request_id=envelope.request_id)
    if create and error.kind is ErrorKind.RETRY_LATER and error.code not in (1302, 1303):
        # A server error after the body went out: Kling may have created (and billed) the task.
        return KlingAmbiguous(f"create outcome unknown after a server error: {error.message}",
                              http_status=error.http_status, code=error.code,
                              request_id=error.request_id, cause=error)
    return error


def _transport_error(exc: requests.RequestException, method: str, path: str, create: bool,
                     secrets: tuple[str, ...]) -> KlingError:
    """The error for a call that got no (complete) HTTP answer."""
    message = _scrub(f"{method} {path}: {type(exc).__name__}: {exc}", *secrets)
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema
                  | requests.exceptions.MissingSchema | requests.exceptions.InvalidHeader):
        return KlingProtocolError(message, cause=exc)
    if create and not _failed_before_sending(exc):
        return KlingAmbiguous(message, cause=exc)
    return KlingRetryLater(message, cause=exc)


def _failed_before_sending(exc: requests.RequestException) -> bool:
    """True only if the request surely never reached the server (connect timeout, refused, DNS)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError) or isinstance(
            exc, requests.exceptions.SSLError | requests.exceptions.ProxyError):
        return False
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


def _task_from(answer: _Answer, error: type[KlingError] = KlingProtocolError,
               what: str = "malformed task in answer") -> KlingTask:
    """The task in a success answer, or ``error`` (protocol error, or ambiguous for a create)."""
    try:
        return KlingTask.from_json(answer.data)
    except ValueError as exc:
        raise error(f"{what}: {exc}", http_status=answer.http_status, request_id=answer.request_id,
                    cause=exc) from exc


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text[:_MAX_MESSAGE_CHARS]


def _endpoint(method: str, path: str) -> str:
    """The metrics' name of a call: create (POST), list (GET of the collection), query (GET of one task)."""
    if method == "POST":
        return "create"
    return "list" if path.rstrip("/").endswith(MULTI_IMAGE2VIDEO_PATH) else "query"


def _code_label(error: KlingError | None) -> str:
    """Kling's answer code as a metrics label: `0` on success, `http_<status>` for an answer without a code,
    `no_answer` when no answer arrived."""
    if error is None:
        return "0"
    if error.code is not None:
        return str(error.code)
    return f"http_{error.http_status}" if error.http_status is not None else "no_answer"


def _log_outcome(method: str, path: str, started: float, error: KlingError | None, *,
                 status: int | None = None, request_id: str | None = None) -> None:
    elapsed = time.monotonic() - started
    metrics.kling_request(_endpoint(method, path), _code_label(error), elapsed)
    fields = {"method": method, "path": path, "elapsed_ms": round(elapsed * 1000)}
    if error is None:
        log.debug("kling call ok", extra={**fields, "http_status": status, "request_id": request_id})
    else:
        log.info("kling call failed", extra={**fields, "http_status": error.http_status, "code": error.code,
                                             "request_id": error.request_id, "kind": error.kind.value})


__all__ = [
    "TASK_STATUSES", "ErrorKind", "KlingAmbiguous", "KlingClient", "KlingError", "KlingFixAccount",
    "KlingFixRequest", "KlingLookupIncomplete", "KlingProtocolError", "KlingRetryLater", "KlingTask",
    "KlingTaskNotFound", "KlingVideo", "TaskStatus", "error_for", "kind_for_code",
]
