"""Framework-free request and reply values passed between the HTTP server and the route handlers.

A Reply can do what a plain WSGI response cannot: wait before answering, drop the connection without
any response, stream a body with a byte-rate limit, or stop after K bytes of a longer announced body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from kling_relay.simulator.errors import ApiError


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded), without the query string
    query: dict[str, list[str]]
    headers: Message
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None  # sent instead of body; length must be set
    length: int = 0
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection without sending anything
    truncate_after: int | None = None  # close after this many body bytes
    rate: int = 0  # body bytes per second, 0 = unlimited
    on_finish: Callable[[int, bool], None] | None = None  # (bytes sent, whole body sent)


def json_reply(status: int, obj: Any) -> Reply:
    return Reply(status=status, body=json.dumps(obj).encode())


def envelope(data: Any) -> Reply:
    """A Kling success envelope with a fresh request_id."""
    return json_reply(200, {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data})


def error_envelope(exc: ApiError) -> Reply:
    """A Kling error envelope; the HTTP status comes from the error table."""
    return json_reply(exc.http_status, {"code": exc.code, "message": exc.message,
                                        "request_id": str(uuid.uuid4()), "data": None})
