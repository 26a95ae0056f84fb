"""gunicorn's logger for the web process (`logger_class` in deploy/gunicorn.conf.py): JSON lines, like every
other log of the relay.

gunicorn's own messages (error log, stderr) go through JsonFormatter, and each request makes one access record
(stdout) with `method`, `path` (decoded, never the query string: a callback URL carries its job's token),
`status`, `bytes`, `duration_ms`, `request_id` (the `X-Request-ID` the app answered with), `remote_addr` and
`user_agent`, plus `job_id` for a request about one job (webhook/request_ids.py). A path or header full of
newlines, escapes or NUL bytes comes out escaped inside one record.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from gunicorn import glogging

from kling_relay.shared.logs import JsonFormatter, configure_logging
from kling_relay.webhook import request_ids

MAX_USER_AGENT_CHARS = 512


def _header(headers: Any, name: str) -> str | None:
    """A header's value from gunicorn's request or response headers (pairs, a dict, or an object with them)."""
    headers = getattr(headers, "headers", headers)
    items = headers.items() if hasattr(headers, "items") else headers
    lowered = name.lower()
    for key, value in items or ():
        if str(key).lower() == lowered:
            return str(value)
    return None


def _path(environ: dict[str, Any]) -> str:
    """PATH_INFO as the client meant it: WSGI hands it over as latin-1 text of the raw bytes."""
    path = str(environ.get("PATH_INFO") or "")
    try:
        return path.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return path


def _status(resp: Any) -> int | None:
    status = getattr(resp, "status_code", None) or getattr(resp, "status", None)
    if isinstance(status, int):
        return status
    head = str(status or "").split(None, 1)
    return int(head[0]) if head and head[0].isdigit() else None


class JsonLogger(glogging.Logger):  # type: ignore[misc]
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # The master's own root logger too (a warning, a library's record before the app is loaded).
        configure_logging()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        if not self.access_log_enabled:
            return
        try:
            user_agent = environ.get("HTTP_USER_AGENT")
            request_id = _header(getattr(resp, "headers", None), request_ids.HEADER) or \
                request_ids.sane(_header(req, request_ids.HEADER))
            self.access_log.info("request", extra={
                "method": environ.get("REQUEST_METHOD"),
                "path": _path(environ),
                "status": _status(resp),
                "bytes": getattr(resp, "sent", None),
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
                "request_id": request_id,
                "remote_addr": environ.get("REMOTE_ADDR"),
                "user_agent": user_agent[:MAX_USER_AGENT_CHARS] if isinstance(user_agent, str) else None,
                **({"job_id": job_id} if isinstance(job_id := environ.get(request_ids.JOB_ID_ENVIRON), str) else {}),
            })
        except Exception:
            self.error_log.exception("access log failed")

