"""The simulator's logs: one JSON object per line (`ts`, `level`, `logger`, `msg` and the record's fields), the
same shape as the relay's, with control characters escaped so a request's path cannot forge a line.

The simulator imports no project code, so this is its own small copy of the relay's formatter.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _ts(created: float) -> str:
    millis = int((created - int(created)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def json_line(msg: str, *, level: str = "info", logger: str = "simulator", **fields: Any) -> str:
    out = {"ts": _ts(time.time()), "level": level, "logger": logger, "msg": msg, **fields}
    return json.dumps(out, default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception:
            msg = f"{record.msg!r} % {record.args!r}"
        out: dict[str, Any] = {"ts": _ts(record.created), "level": record.levelname.lower(), "logger": record.name,
                               "msg": msg}
        out.update((k, v) for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_"))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return json.dumps(out, default=str, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return json.dumps({k: v if v is None or isinstance(v, (str, bool, int)) else repr(v)
                               for k, v in out.items()})


def configure(level: str) -> None:
    """Root logger → stderr as JSON lines; Python warnings too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
