"""Helpers the views share: the Runtime of this app and JSON error replies."""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify

from shared.runtime import Runtime


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["kling_relay"]
    return rt


def error(status: int, message: str, **fields: Any) -> Any:
    return jsonify(error=message, **fields), status
