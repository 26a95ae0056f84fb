"""The Kling routes under `<prefix>/v1/videos/multi-image2video`.

| route | answer |
| --- | --- |
| POST `.../multi-image2video` | create a task |
| GET `.../multi-image2video?pageNum=&pageSize=` | list tasks, newest first (`list_order`: oldest first) |
| GET `.../multi-image2video/{id}` | one task by task_id, else by external_task_id (`path_external_id`) |
Any other method or path answers 404 code 1202. Checks run in this order: auth, forced error, rate
limit (creates), server error, body validation, duplicate id / in-flight cap, ambiguous answer.

Kling documents no other lookup: a `?external_task_id=` query parameter is ignored (the list is answered).

Like a reseller's gateway: `no_query` serves no read route (every GET answers 404 with the gateway's own JSON,
before any auth check), and `foreign_answers` rewrites the answers of the read routes (`query`) or of every route
(`all`) into a gateway's own shape, `{"success": true, "result": <data>}` or `{"success": false, "error": {...}}`,
with the same HTTP status: not Kling's envelope.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from kling_relay.simulator.errors import ApiError
from kling_relay.simulator.replies import Reply, Request, envelope, error_envelope, json_reply
from kling_relay.simulator.validation import parse_create

if TYPE_CHECKING:
    from kling_relay.simulator.app import SimulatorApp

COLLECTION = "/v1/videos/multi-image2video"
ITEM = COLLECTION + "/{id}"


def route_of(rest: str) -> tuple[str, str | None]:
    """(route template, raw id or None) of a path below the prefix; template '' if unknown."""
    if rest in (COLLECTION, COLLECTION + "/"):
        return COLLECTION, None
    if rest.startswith(COLLECTION + "/"):
        tail = rest[len(COLLECTION) + 1:]
        if tail and "/" not in tail:
            return ITEM, tail
    return "", None


def handle(app: SimulatorApp, req: Request, rest: str) -> Reply:
    template, raw_id = route_of(rest)
    app.stats.request(f"{req.method} {template or '(unknown)'}")
    knobs = app.faults.knobs
    if knobs.no_query and template and req.method == "GET":
        return json_reply(404, {"error": {"message": f"Invalid URL (GET {req.path})", "type": "invalid_request_error"}})
    reply = _kling(app, req, template, raw_id)
    if knobs.foreign_answers == "all" or (knobs.foreign_answers == "query" and req.method == "GET"):
        return _foreign(reply)
    return reply


def _foreign(reply: Reply) -> Reply:
    """The same answer in a gateway's own shape (see the module docstring); a dropped answer stays dropped."""
    try:
        kling = json.loads(reply.body)
    except ValueError:
        return reply
    if kling.get("code") == 0:
        body = {"success": True, "result": kling.get("data")}
    else:
        body = {"success": False, "error": {"message": kling.get("message"), "kling_code": kling.get("code")}}
    reply.body = json.dumps(body).encode()
    return reply


def _kling(app: SimulatorApp, req: Request, template: str, raw_id: str | None) -> Reply:
    try:
        if template == COLLECTION and req.method == "POST":
            return _create(app, req)
        if template == COLLECTION and req.method == "GET":
            return _query(app, req, lambda: _list(app, req))
        if template == ITEM and req.method == "GET":
            task_id = unquote(raw_id or "")
            return _query(app, req, lambda: _one(app, task_id))
        raise ApiError(1202, f"{req.method} is not supported on this path" if template else "unknown path")
    except ApiError as exc:
        app.stats.error_code(exc.code)
        return error_envelope(exc)


def _preflight(app: SimulatorApp, req: Request, scope: str) -> bool:
    """Auth, forced error and server-error checks; True if a server error is due after the create."""
    app.auth.check(req.headers.get("Authorization"), time.time())
    knobs = app.faults.knobs
    if knobs.force_error_code and knobs.force_error_on in (scope, "all"):
        raise ApiError(knobs.force_error_code)
    if scope == "create" and app.faults.hit("rate_limit"):
        raise ApiError(1302)
    if knobs.server_error_on in (scope, "all") and app.faults.hit("server_error"):
        if scope == "create" and knobs.server_error_creates_task:
            return True
        raise ApiError(knobs.server_error_code)
    return False


def _create(app: SimulatorApp, req: Request) -> Reply:
    error_after_create = _preflight(app, req, "create")
    knobs = app.faults.knobs
    request = parse_create(req.body, prompt_max_chars=knobs.prompt_max_chars)
    created = app.engine.create(request)
    if error_after_create:
        raise ApiError(knobs.server_error_code)
    reply = envelope(created)
    if app.faults.hit("ambiguous_create"):
        if knobs.ambiguous_create_mode == "drop":
            reply.drop = True
        else:
            reply.delay = knobs.ambiguous_create_delay
    return reply


def _query(app: SimulatorApp, req: Request, answer: Callable[[], Reply]) -> Reply:
    _preflight(app, req, "query")
    return answer()


def _one(app: SimulatorApp, task_or_external_id: str) -> Reply:
    task = app.engine.store.find(task_or_external_id, by_external=app.faults.knobs.path_external_id)
    if task is None:
        raise ApiError(1203, "task not found")
    with app.engine.store.lock:
        return envelope(task.to_json())


def _int_arg(req: Request, name: str, default: int, low: int, high: int) -> int:
    raw = req.arg(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(1201, f"{name} must be an integer between {low} and {high}") from None
    if not low <= value <= high:
        raise ApiError(1201, f"{name} must be an integer between {low} and {high}")
    return value


def _list(app: SimulatorApp, req: Request) -> Reply:
    page_num = _int_arg(req, "pageNum", 1, 1, 1000)
    page_size = _int_arg(req, "pageSize", 30, 1, 500)
    newest_first = app.faults.knobs.list_order == "newest"
    return envelope(app.engine.store.page(page_num, page_size, newest_first=newest_first))
