"""Helpers the views share: the Runtime of this app, JSON error replies, job ids and API callers."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, jsonify, request

from kling_relay.shared.inputs import is_job_id
from kling_relay.shared.runtime import Runtime


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["kling_relay"]
    return rt


def error(status: int, message: str, **fields: Any) -> Any:
    return jsonify(error=message, **fields), status


def valid_job_id(job_id: str) -> bool:
    """Whether the path segment can be a job id (shared/inputs.py); anything else is never looked up, so a path
    segment cannot name another key of the store (e.g. a job's `:events` list)."""
    return is_job_id(job_id)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: NaN/Infinity are refused (they would come back as invalid JSON); ValueError on any problem."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def read_body(limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes (Content-Length or not: chunked bodies too).

    The app's MAX_CONTENT_LENGTH is one byte over the largest limit, so a chunked body that Werkzeug would cut
    at the maximum shows up here as too long instead of arriving truncated.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    raw = request.stream.read(limit + 1)
    return None if len(raw) > limit else raw
