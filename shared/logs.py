"""Structured logs: one JSON object per line, a constant message plus fields (`extra=`), never a secret.

Every line is one record that `json.loads` reads back: control characters (newline, carriage return, escape,
NUL...) and every non-ASCII character in a message or a field are escaped (`\\n`, `\\u001b`), so a value that
came from a request (a path, a header) cannot start a line of its own or colour a terminal. A record that
cannot be rendered as it is (a NaN, an object without a JSON form, a message whose %-arguments do not fit) is
still written, with the odd values as strings.

`configure_logging()` sends the root logger to stderr through JsonFormatter and routes Python warnings there
too. `bind(request_id=...)` adds fields to every record logged in the current context (thread, greenlet) until
`unbind()`; `bound(job_id=...)` does the same for a `with` block, and `add(kling_task_id=...)` adds to the
innermost such block. That is how the ids that tie one job together across processes get onto every line: the
web process binds the request id (`X-Request-ID`) for a request and the job id once it has one, the worker binds
`job_id` (plus the request id that queued a submit, and `kling_task_id` once known) for the whole of a task, the
reconciler for each job it looks at. A field passed in `extra=` wins over a bound one of the same name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_context: ContextVar[dict[str, Any]] = ContextVar("kling_relay_log_context", default={})  # noqa: B039 - never mutated
_scopes: ContextVar[int] = ContextVar("kling_relay_log_scopes", default=0)


def timestamp(created: float) -> str:
    """UTC ISO 8601 with milliseconds and a `Z`, as every record's `ts`."""
    millis = int((created - int(created)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def dumps(fields: dict[str, Any]) -> str:
    """One JSON object on one line, ASCII only (control characters escaped); odd values become strings."""
    try:
        return json.dumps(fields, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        safe = {str(k): v if v is None or isinstance(v, (str, bool, int)) else repr(v) for k, v in fields.items()}
        return json.dumps(safe)


def json_line(msg: str, *, level: str = "info", logger: str = "kling_relay", **fields: Any) -> str:
    """A record in the same shape as JsonFormatter's, for the rare writer that cannot go through `logging`
    (a signal handler, a ready line on stdout)."""
    return dumps({"ts": timestamp(time.time()), "level": level, "logger": logger, "msg": msg, **fields})


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a %-format that does not fit its arguments: keep both rather than lose the record
        return f"{record.msg!r} % {record.args!r}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in _context.get().items():
            out.setdefault(key, value)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return dumps(out)


def is_request_id(value: str) -> bool:
    """A sane request id (`X-Request-ID`): 1–128 letters, digits and `.`, `_`, `:`, `-`."""
    return _REQUEST_ID.fullmatch(value) is not None


def bind(**fields: Any) -> Token[dict[str, Any]]:
    """Add fields to every record logged in this context (thread, greenlet) until unbind(token)."""
    return _context.set({**_context.get(), **fields})


def unbind(token: Token[dict[str, Any]]) -> None:
    try:
        _context.reset(token)
    except ValueError:  # a token of another context: nothing of ours to undo here
        pass


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """`bind(**fields)` for the duration of a `with` block; fields whose value is None are left out. Inside it,
    `add()` binds more fields until the block ends."""
    token = bind(**{k: v for k, v in fields.items() if v is not None})
    depth = _scopes.set(_scopes.get() + 1)
    try:
        yield
    finally:
        _scopes.reset(depth)
        unbind(token)


def add(**fields: Any) -> None:
    """Bind fields (None values left out) until the innermost `bound()` block ends: e.g. `kling_task_id` once a
    step learns it, for the rest of the task. Outside any `bound()` block it does nothing (nothing would undo it)."""
    if _scopes.get() > 0:
        bind(**{k: v for k, v in fields.items() if v is not None})


def bound_fields() -> dict[str, Any]:
    """The fields bound in this context now (a copy)."""
    return dict(_context.get())


def configure_logging(level: str | int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("LOG_LEVEL", "INFO").upper())
    # A warning (a library's DeprecationWarning, Celery's "running as root") is a record too, not raw stderr.
    logging.captureWarnings(True)
    # At DEBUG these log full URLs (callback tokens, signed video URLs) or signed request headers (botocore):
    # keep them quiet whatever LOG_LEVEL says.
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
