"""Kling's side: `POST /callbacks/kling/<job_id>?token=...`. Verify, record one state step, answer fast.

Callbacks are unsigned, so the per-job token (HMAC of the job id) is the only proof the caller knows the URL we
gave Kling. The body is checked for shape and its task_id must be the job's; the URL in it is never used (the
copy re-reads the task from Kling). Duplicates and stale updates get a 2xx and change nothing.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from kling_relay.shared.kling import KlingTask
from kling_relay.shared.pipeline import apply_task_status
from kling_relay.shared.tokens import callback_token_ok
from kling_relay.webhook.common import error, parse_json, read_body, runtime, valid_job_id

bp = Blueprint("callbacks", __name__)


@bp.post("/callbacks/kling/<job_id>")
def kling_callback(job_id: str) -> Any:
    rt = runtime()
    if not valid_job_id(job_id) or not callback_token_ok(rt.settings.callback_secret, job_id,
                                                         request.args.get("token")):
        return error(403, "bad callback token")
    limit = rt.settings.max_callback_bytes
    raw = read_body(limit)
    if raw is None:
        return error(413, f"callback body over {limit} bytes")
    job = rt.store.get(job_id)
    if job is None:
        return error(404, "unknown job")
    try:
        task = KlingTask.from_json(parse_json(raw))
    except (ValueError, TypeError) as exc:
        return error(400, f"not a Kling task object: {exc}")
    if task.external_task_id is not None and task.external_task_id != job_id:
        return error(409, "external_task_id does not match this job")
    if job.kling_task_id != task.task_id:
        if job.kling_task_id is not None:
            return error(409, "task_id does not match this job's Kling task")
        if task.external_task_id != job_id:
            # Before the worker has recorded the task, only a task that names this job may claim it: a token
            # alone must not bind the job to another job's task (whose video the copy would then store here).
            return error(409, "task_info.external_task_id must name this job until its task id is known")
        ok, _existing = rt.store.set_kling_task_id(job_id, task.task_id, source="callback")
        if not ok:
            return error(409, "task_id does not match this job's Kling task")
    result = apply_task_status(rt, job_id, task, source="callback")
    return jsonify(ok=True, applied=result.applied, state=result.job.state.value)
