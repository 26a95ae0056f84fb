"""The jobs API for backend apps: `POST /v1/jobs`, `GET /v1/jobs/<id>`, `GET /v1/jobs?state=&limit=&cursor=`,
the ops actions `POST /v1/jobs/<id>/retry` and `POST /v1/jobs/<id>/cancel`, and the ops views `GET /v1/status`,
`POST /v1/submission/resume` and `POST /v1/copy/resume`.

Bearer tokens from API_TOKENS. Bad input never stores or queues anything: 400 (not JSON), 413 (too large),
422 (every field problem at once), 409 (Idempotency-Key reused with another body; an ops action the job's state
does not allow, with the reason). `webhook/openapi.py` describes all of it; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, g, jsonify, request

from kling_relay.shared import copy_flow, limits, usage
from kling_relay.shared.inputs import safe_text
from kling_relay.shared.intake import accept_job
from kling_relay.shared.jobs import IdempotencyConflict, InvalidCursor, JobNotFound, JobState, StepResult
from kling_relay.shared.notify import EventsStream
from kling_relay.shared.ops import ActionRefused, action_problems, cancel_job, retry_job, submission_status
from kling_relay.shared.tokens import bearer_ok
from kling_relay.shared.tokens import bearer_token_number as token_number
from kling_relay.shared.validation import FieldProblem, ValidationFailed, problems_payload
from kling_relay.webhook import request_ids
from kling_relay.webhook.common import error, parse_json, read_body, runtime, valid_job_id

bp = Blueprint("api", __name__, url_prefix="/v1")
MAX_LIST_LIMIT = limits.LIST_LIMIT_MAX
MAX_ACTION_BODY_BYTES = limits.ACTION_BODY_MAX_BYTES


@bp.before_request
def require_token() -> Any:
    if not bearer_ok(request.headers.get("Authorization"), runtime().settings.api_tokens):
        response, status = error(401, "missing or invalid bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kling-relay"'
        return response, status
    return None


def _unprocessable(problems: list[FieldProblem]) -> Any:
    return jsonify(problems_payload(problems)), 422


@bp.post("/jobs")
def create_job() -> Any:
    rt = runtime()
    if request.mimetype != "application/json":
        return error(400, "send the job as JSON with Content-Type: application/json")
    raw = read_body(rt.settings.max_request_bytes)
    if raw is None:
        return error(413, f"body over {rt.settings.max_request_bytes} bytes")
    try:
        body = parse_json(raw)
    except ValueError as exc:
        return error(400, f"body is not valid JSON: {exc}")
    try:
        accepted = accept_job(body, store=rt.store, enqueuer=rt.enqueuer, settings=rt.settings,
                              idempotency_key=request.headers.get("Idempotency-Key"),
                              request_id=g.get("request_id"))
    except ValidationFailed as exc:
        return _unprocessable(list(exc.problems))
    except IdempotencyConflict:
        return error(409, "Idempotency-Key was already used with a different request body")
    request_ids.note_job(accepted.job.id)
    response = jsonify(accepted.job.public_dict(rt.store.events(accepted.job.id)))
    response.headers["Location"] = f"/v1/jobs/{accepted.job.id}"
    if not accepted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return response, 202


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    rt = runtime()
    job = rt.store.get(job_id) if valid_job_id(job_id) else None
    if job is None:
        return error(404, "no such job")
    return jsonify(job.public_dict(rt.store.events(job_id)))


@bp.get("/jobs")
def list_jobs() -> Any:
    rt = runtime()
    problems: list[FieldProblem] = []
    state: JobState | None = None
    raw_state = request.args.get("state")
    if raw_state:
        try:
            state = JobState(raw_state)
        except ValueError:
            problems.append(FieldProblem("state", f"must be one of {', '.join(s.value for s in JobState)}"))
    limit = limits.LIST_LIMIT_DEFAULT
    raw_limit = request.args.get("limit")
    if raw_limit is not None:
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 3) or \
                not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            problems.append(FieldProblem("limit", f"must be a whole number from 1 to {MAX_LIST_LIMIT}"))
        else:
            limit = int(raw_limit)
    if problems:
        return _unprocessable(problems)
    cursor = request.args.get("cursor") or None
    try:
        jobs, next_cursor = rt.store.list(state=state, limit=limit, cursor=cursor)
    except InvalidCursor:
        return _unprocessable([FieldProblem("cursor", "is not a cursor this API returned")])
    return jsonify(jobs=[j.public_dict() for j in jobs], next_cursor=next_cursor)


def _action_detail() -> tuple[dict[str, Any] | None, Any]:
    """The event detail of an ops action from its optional JSON body `{"reason": "..."}`, or an error reply."""
    rt = runtime()
    detail: dict[str, Any] = {"via": "http",
                              "api_token": token_number(request.headers.get("Authorization"), rt.settings.api_tokens)}
    raw = read_body(MAX_ACTION_BODY_BYTES)
    if raw is None:
        return None, error(413, f"body over {MAX_ACTION_BODY_BYTES} bytes")
    if not raw.strip():
        return detail, None
    if request.mimetype != "application/json":
        return None, error(400, "send the body (optional) as JSON with Content-Type: application/json")
    try:
        body = parse_json(raw)
    except ValueError as exc:
        return None, error(400, f"body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return None, _unprocessable([FieldProblem("body", 'must be a JSON object such as {"reason": "..."}')])
    problems = [FieldProblem(safe_text(str(k)), "unknown field (allowed: reason)") for k in body if k != "reason"]
    reason = body.get("reason")
    problems += action_problems(reason)
    if problems:
        return None, _unprocessable(problems)
    if reason:
        detail["reason"] = reason
    return detail, None


def _act(job_id: str, action: Callable[[dict[str, Any]], StepResult]) -> Any:
    if not valid_job_id(job_id):
        return error(404, "no such job")
    detail, failed = _action_detail()
    if failed is not None:
        return failed
    assert detail is not None
    try:
        result = action(detail)
    except JobNotFound:
        return error(404, "no such job")
    except ValidationFailed as exc:
        return _unprocessable(list(exc.problems))
    except ActionRefused as exc:
        return error(409, exc.reason, state=exc.job.state.value)
    return jsonify(result.job.public_dict(runtime().store.events(job_id)))


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str) -> Any:
    """Failed → back to work: re-copy after copy_exhausted, re-submit (looking up first) after a submit-side
    failure; 409 with the reason otherwise (e.g. kling_failed: Kling allows one task per job id)."""
    rt = runtime()
    return _act(job_id, lambda detail: retry_job(rt.store, rt.enqueuer, job_id, detail=detail,
                                                 due_in=rt.settings.reconcile_quiet_seconds))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Queued/submitted/processing/generated → canceled; 409 for a finished job."""
    rt = runtime()
    return _act(job_id, lambda detail: cancel_job(rt.store, rt.enqueuer, job_id, detail=detail,
                                                  stream=EventsStream.of(rt.settings)))


@bp.get("/status")
def get_status() -> Any:
    """Whether submission to Kling is open or paused (and why), tasks in flight, and jobs per state."""
    rt = runtime()
    return jsonify(submission_status(rt.store, now=rt.clock()))


@bp.post("/submission/resume")
def resume_submission() -> Any:
    """Clear a pause after an account or auth error was fixed (a budget pause: the daily unit budget is off until
    midnight UTC); queued jobs resume as the reconciler finds them."""
    rt = runtime()
    who = token_number(request.headers.get("Authorization"), rt.settings.api_tokens)
    cleared = usage.operator_resume(rt.redis, by=f"api_token:{who}", now=rt.clock())
    return jsonify(resumed=cleared is not None, pause=cleared)


@bp.post("/copy/resume")
def resume_copy() -> Any:
    """Clear a copy pause after the storage setting was fixed; waiting jobs are copied as the reconciler finds them."""
    rt = runtime()
    who = token_number(request.headers.get("Authorization"), rt.settings.api_tokens)
    cleared = copy_flow.resume(rt.redis, by=f"api_token:{who}")
    return jsonify(resumed=cleared is not None, pause=cleared)
