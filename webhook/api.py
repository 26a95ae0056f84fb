"""The jobs API for backend apps: `POST /v1/jobs`, `GET /v1/jobs/<id>`, `GET /v1/jobs?state=&limit=&cursor=`.

Bearer tokens from API_TOKENS. Bad input never stores or queues anything: 400 (not JSON), 413 (too large),
422 (every field problem at once), 409 (Idempotency-Key reused with another body).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, jsonify, request

from shared.intake import accept_job
from shared.jobs import IdempotencyConflict, JobState
from shared.tokens import bearer_ok
from shared.validation import FieldProblem, ValidationFailed, problems_payload
from webhook.common import error, runtime

bp = Blueprint("api", __name__, url_prefix="/v1")
MAX_LIST_LIMIT = 200


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
    raw = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH → 413 before we read it
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, f"body is not valid JSON: {exc}")
    try:
        accepted = accept_job(body, store=rt.store, enqueuer=rt.enqueuer, settings=rt.settings,
                              idempotency_key=request.headers.get("Idempotency-Key"))
    except ValidationFailed as exc:
        return _unprocessable(list(exc.problems))
    except IdempotencyConflict:
        return error(409, "Idempotency-Key was already used with a different request body")
    response = jsonify(accepted.job.public_dict(rt.store.events(accepted.job.id)))
    response.headers["Location"] = f"/v1/jobs/{accepted.job.id}"
    if not accepted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return response, 202


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    rt = runtime()
    job = rt.store.get(job_id) if len(job_id) <= 64 else None
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
    limit = 50
    raw_limit = request.args.get("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            problems.append(FieldProblem("limit", f"must be a whole number from 1 to {MAX_LIST_LIMIT}"))
        else:
            limit = int(raw_limit)
    if problems:
        return _unprocessable(problems)
    try:
        jobs, next_cursor = rt.store.list(state=state, limit=limit, cursor=request.args.get("cursor") or None)
    except ValueError:
        return _unprocessable([FieldProblem("cursor", "is not a cursor this API returned")])
    return jsonify(jobs=[j.public_dict() for j in jobs], next_cursor=next_cursor)


