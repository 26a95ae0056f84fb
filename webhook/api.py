"""The jobs API for backend apps: `POST /v1/jobs`, `GET /v1/jobs/<id>`, `GET /v1/jobs?state=&limit=&cursor=`,
the ops actions `POST /v1/jobs/<id>/retry` and `POST /v1/jobs/<id>/cancel`, and the ops views `GET /v1/status`,
`POST /v1/submission/resume` and `POST /v1/copy/resume`.

Bearer tokens: apps (API_TOKENS) and operators (OPS_TOKENS; while it is unset, every API token is also an
operator), `shared/tokens.py: Caller`. An app sees and acts on its own jobs only: another app's job answers 404,
as an unknown id would; its list is its own index. Operators see every job (and may list one app's with
`?app=`); the ops-only routes (`/status`, `/submission/resume`, `/copy/resume`) answer 403 to an app. An app at
its APP_MAX_ACTIVE_JOBS cap gets 429 with Retry-After at submit.

Bad input never stores or queues anything: 400 (not JSON), 413 (too large),
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
from kling_relay.shared.jobs import (
    AppBusy,
    IdempotencyConflict,
    InvalidCursor,
    JobNotFound,
    JobState,
    StepResult,
)
from kling_relay.shared.notify import EventsStream
from kling_relay.shared.ops import ActionRefused, action_problems, cancel_job, retry_job, submission_status
from kling_relay.shared.settings_spec import TOKEN_NAME
from kling_relay.shared.tokens import Caller, identify
from kling_relay.shared.validation import FieldProblem, ValidationFailed, problems_payload
from kling_relay.webhook import request_ids
from kling_relay.webhook.common import error, parse_json, read_body, runtime, valid_job_id

bp = Blueprint("api", __name__, url_prefix="/v1")
MAX_LIST_LIMIT = limits.LIST_LIMIT_MAX
MAX_ACTION_BODY_BYTES = limits.ACTION_BODY_MAX_BYTES
#: Seconds a 429 (the app's active-jobs cap) asks the app to wait before it submits again.
APP_BUSY_RETRY_AFTER_SECONDS = 30
#: The routes only operators may call (endpoint names); an app token gets 403.
OPS_ONLY = frozenset({"api.get_status", "api.resume_submission", "api.resume_copy"})


@bp.before_request
def require_token() -> Any:
    settings = runtime().settings
    caller = identify(request.headers.get("Authorization"), settings.api_tokens, settings.ops_tokens)
    if caller is None:
        response, status = error(401, "missing or invalid bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kling-relay"'
        return response, status
    g.caller = caller
    if request.endpoint in OPS_ONLY and not caller.ops:
        return error(403, "this route is for operators (OPS_TOKENS); an app token cannot call it")
    return None


def caller() -> Caller:
    """Who the request comes from (set by `require_token`)."""
    found: Caller = g.caller
    return found


def _sees(job_app: str | None) -> bool:
    scope = caller().app_scope
    return scope is None or job_app == scope


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
                              idempotency_key=request.headers.get("Idempotency-Key"), app=caller().name,
                              max_active=rt.settings.app_max_active_jobs, request_id=g.get("request_id"))
    except ValidationFailed as exc:
        return _unprocessable(list(exc.problems))
    except AppBusy as exc:
        response, status = error(429, f"this app has {exc.active} jobs queued or in progress, its cap "
                                      f"(APP_MAX_ACTIVE_JOBS); submit again once some have finished",
                                 limit="APP_MAX_ACTIVE_JOBS", active=exc.active)
        response.headers["Retry-After"] = str(APP_BUSY_RETRY_AFTER_SECONDS)
        return response, status
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
    if job is None or not _sees(job.app):  # another app's job: as if there were none
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
    app = caller().app_scope
    raw_app = request.args.get("app")
    if raw_app is not None:
        if not TOKEN_NAME.match(raw_app):
            problems.append(FieldProblem("app", "must be an app's name (a-z, 0-9, '_', '-')"))
        elif app is not None and raw_app != app:
            problems.append(FieldProblem("app", "an app token lists its own jobs only"))
        else:
            app = raw_app
    if problems:
        return _unprocessable(problems)
    cursor = request.args.get("cursor") or None
    try:
        jobs, next_cursor = rt.store.list(state=state, limit=limit, cursor=cursor, app=app)
    except InvalidCursor:
        return _unprocessable([FieldProblem("cursor", "is not a cursor this API returned")])
    return jsonify(jobs=[j.public_dict() for j in jobs], next_cursor=next_cursor)


def _action_detail() -> tuple[dict[str, Any] | None, Any]:
    """The event detail of an ops action from its optional JSON body `{"reason": "..."}`, or an error reply."""
    detail: dict[str, Any] = {"via": f"http:{caller().name}"}
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
                                                 due_in=rt.settings.reconcile_quiet_seconds,
                                                 app=caller().app_scope))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Queued/submitted/processing/generated → canceled; 409 for a finished job."""
    rt = runtime()
    return _act(job_id, lambda detail: cancel_job(rt.store, rt.enqueuer, job_id, detail=detail,
                                                  stream=EventsStream.of(rt.settings), app=caller().app_scope))


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
    cleared = usage.operator_resume(rt.redis, by=f"http:{caller().name}", now=rt.clock())
    return jsonify(resumed=cleared is not None, pause=cleared)


@bp.post("/copy/resume")
def resume_copy() -> Any:
    """Clear a copy pause after the storage setting was fixed; waiting jobs are copied as the reconciler finds them."""
    rt = runtime()
    cleared = copy_flow.resume(rt.redis, by=f"http:{caller().name}")
    return jsonify(resumed=cleared is not None, pause=cleared)
