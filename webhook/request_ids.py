"""Request ids: every answer of the web process carries `X-Request-ID`, and the access log line prints it.

The caller's `X-Request-ID` is kept when it is a sane token (1–128 letters, digits and `.`, `_`, `:`, `-`), so a
proxy or a backend app can follow its own id through; anything else (too long, spaces, control characters) is
replaced by a fresh random id. Every record the app logs while it handles the request carries `request_id` too.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Flask, Response, g, request

from kling_relay.shared.logs import bind, is_request_id, unbind

HEADER = "X-Request-ID"


def sane(value: str | None) -> str | None:
    """The value if it is a sane request id, else None."""
    return value if value is not None and is_request_id(value) else None


def new() -> str:
    return uuid.uuid4().hex


def install(app: Flask) -> None:
    @app.before_request
    def take_request_id() -> None:
        g.request_id = sane(request.headers.get(HEADER)) or new()
        g.request_log_token = bind(request_id=g.request_id)

    @app.after_request
    def give_request_id(response: Response) -> Response:
        response.headers[HEADER] = g.get("request_id") or new()
        return response

    @app.teardown_request
    def forget_request_id(exc: BaseException | None) -> Any:
        token = g.pop("request_log_token", None)
        if token is not None:
            unbind(token)
