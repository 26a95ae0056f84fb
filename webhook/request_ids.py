"""Request ids: every answer of the web process carries `X-Request-ID`, and the access log line prints it.

The caller's `X-Request-ID` is kept when it is a sane token (1–128 letters, digits and `.`, `_`, `:`, `-`), so a
proxy or a backend app can follow its own id through; anything else (too long, spaces, control characters) is
replaced by a fresh random id. Every record the app logs while it handles the request carries `request_id` too,
and `job_id` when the request is about one job (a `<job_id>` in its route, or the job `POST /v1/jobs` just made:
`note_job`); the job id is also left in the WSGI environ (`JOB_ID_ENVIRON`) for the access log line.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, g, request

from kling_relay.shared.inputs import is_job_id
from kling_relay.shared.logs import bind, is_request_id, unbind

HEADER = "X-Request-ID"
JOB_ID_ENVIRON = "kling_relay.job_id"


def sane(value: str | None) -> str | None:
    """The value if it is a sane request id, else None."""
    return value if value is not None and is_request_id(value) else None


def note_job(job_id: str) -> None:
    """The request made this job: its id on the rest of the request's records and on its access line."""
    request.environ[JOB_ID_ENVIRON] = job_id
    bind(job_id=job_id)  # undone with the request's own binding at teardown


def new() -> str:
    """A fresh id: 32 random hex digits."""
    return os.urandom(16).hex()


def install(app: Flask) -> None:
    @app.before_request
    def take_request_id() -> None:
        g.request_id = sane(request.headers.get(HEADER)) or new()
        fields = {"request_id": g.request_id}
        job_id = (request.view_args or {}).get("job_id")
        if is_job_id(job_id):
            fields["job_id"] = request.environ[JOB_ID_ENVIRON] = job_id
        g.request_log_token = bind(**fields)

    @app.after_request
    def give_request_id(response: Response) -> Response:
        response.headers[HEADER] = g.get("request_id") or new()
        return response

    @app.teardown_request
    def forget_request_id(exc: BaseException | None) -> Any:
        token = g.pop("request_log_token", None)
        if token is not None:
            unbind(token)
