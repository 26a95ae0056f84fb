"""Test-only routes under /_sim (no auth): knobs, stats, reset, health, and the result videos.

- `GET /_sim/control` -> current knobs; `POST /_sim/control` with a JSON object of knob -> value
  applies them (400 `{"error"}` naming a bad knob, nothing applied) and returns the knobs.
- `GET /_sim/stats` -> counters (see kling_relay.simulator.stats) plus `videos` (per task: video_id, size,
  sha256, synthetic), `tasks` (task_id -> status) and `in_flight`.
- `POST /_sim/reset` -> forget tasks, queued callbacks, files and counters, and restore the startup
  knobs; send `{"knobs": false}` to keep the current knobs.
- `GET /_sim/health` -> `{"ok": true}`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kling_relay.simulator import downloads
from kling_relay.simulator.replies import Reply, Request, json_reply
from kling_relay.simulator.urls import VIDEO_PATH_PREFIX

if TYPE_CHECKING:
    from kling_relay.simulator.app import SimulatorApp


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def handle(app: SimulatorApp, req: Request) -> Reply:
    if req.path.startswith(VIDEO_PATH_PREFIX):
        return downloads.serve(app, req)
    route = (req.method, req.path.rstrip("/"))
    if route == ("GET", "/_sim/health"):
        return json_reply(200, {"ok": True})
    if route == ("GET", "/_sim/control"):
        return json_reply(200, app.faults.knobs.as_dict())
    if route == ("POST", "/_sim/control"):
        changes = _json_object(req.body)
        if changes is None:
            return json_reply(400, {"error": "body must be a JSON object of knob -> value"})
        try:
            knobs = app.faults.update(changes)
        except ValueError as exc:
            return json_reply(400, {"error": str(exc)})
        return json_reply(200, knobs.as_dict())
    if route == ("GET", "/_sim/stats"):
        return json_reply(200, app.stats_snapshot())
    if route == ("POST", "/_sim/reset"):
        options = _json_object(req.body)
        if options is None:
            return json_reply(400, {"error": "body must be empty or a JSON object"})
        app.reset(restore_knobs=bool(options.get("knobs", True)))
        return json_reply(200, {"ok": True, "knobs": app.faults.knobs.as_dict()})
    return json_reply(404, {"error": f"no simulator route {req.method} {req.path}"})
