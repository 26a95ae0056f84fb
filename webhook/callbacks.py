"""Kling's side: `POST /callbacks/kling/<job_id>?token=...`. Verify, record one state step, answer fast.

Kling's callbacks are unsigned by default, so the per-job token (HMAC of the job id) is the proof the caller knows
the URL we gave Kling. Once a webhook secret is created in Kling's console and given as KLING_WEBHOOK_SECRET, each
callback must also carry a valid Standard Webhooks signature (`webhook-id`, `webhook-timestamp` within five
minutes, `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, checked over the raw body by
`kling_relay.shared.http_client.verify`): a missing, wrong or stale one is `401` and changes nothing. The body is
checked for shape and its task_id must be the job's; the URL in it is used only where Kling's tasks cannot be read
back (callbacks-only mode; otherwise the copy re-reads the task from Kling). Duplicates and stale updates get a 2xx
and change nothing. A callback for a job bound to its task, a repeat or a step, is answered before Flask
(`BoundCallbacksFirst`), exactly as the view would answer it, and a repeat this process can prove changes nothing
(the job's bound task and a state it already passed, seen here moments ago) from memory, without a Redis round
trip (`shared/recent.py`).

A callback's token never binds a job to a task. Only the worker does, with a task that Kling itself answered: the
create's answer, or a lookup by `external_task_id` (the worker's, or the reconciler's poll). So a callback that arrives
before the worker has recorded the job's task (a real one racing the create's answer, or one forged with a
stolen token, `external_task_id` = the job id and a made-up `task_id`) is answered `202` and changes neither the
job's task nor its state: the real task always wins, and no made-up task can orphan the billed one. When a
create may have reached Kling and the job is still `queued` (its answer lost, the worker backing off), such a
callback only makes the job due now, so the reconciler re-sends the submit, whose lookup by `external_task_id`
finds the real task sooner.

Why not confirm the callback's task with Kling here (a GET by task id) and bind it then? The web process would
call Kling inside a request that must answer fast and never fail: Kling's timeouts, rate limit and account
errors would hold the threads Kling's callbacks need, and a stolen token could make us spend the rate limit.
It would also bind nothing more than the worker's own lookup, and neither works where Kling's read routes do
not exist (gateways that serve only the create): there a callback could be trusted only with Kling's signature.

What a callback says is kept (`shared/heard.py`: per status and task id, for the job's own task or, before one is
recorded, one that names the job), before its step is applied: in callbacks-only mode the copy takes the video URLs
from the `succeed` callback of the job's bound task, and a status that beat the create's answer is applied once
the worker binds the task. With `KLING_WEBHOOK_SECRET` set, a callback that passed the signature check carries
Kling's own word: it may bind the task of a queued job whose create was sent but not answered
(`heard.may_bind_from_callback`), the one way such a job gets its task in callbacks-only mode.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import redis
from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.datastructures import EnvironHeaders

from kling_relay.shared import heard, metrics, usage
from kling_relay.shared.heard import Glimpse
from kling_relay.shared.http_client import verify
from kling_relay.shared.jobs import Job, JobNotFound, JobState, StepResult
from kling_relay.shared.jobs_model import step_applies
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.logs import add, bound
from kling_relay.shared.pipeline import CREATE_SENT, KLING_STATUS_TO_STATE, apply_task_status, record_task
from kling_relay.shared.recent import RecentStates, Seen
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.tokens import callback_token_ok
from kling_relay.webhook.common import error, parse_json, read_body, runtime, valid_job_id
from kling_relay.webhook.request_ids import HEADER as REQUEST_ID_HEADER
from kling_relay.webhook.request_ids import JOB_ID_ENVIRON, new, sane

log = logging.getLogger(__name__)
bp = Blueprint("callbacks", __name__)
#: How far a signed callback's `webhook-timestamp` may be from our clock (Kling's docs: five minutes).
SIGNATURE_TOLERANCE_SECONDS = 300


@bp.post("/callbacks/kling/<job_id>")
def kling_callback(job_id: str) -> Any:
    rt = runtime()
    if not valid_job_id(job_id) or not callback_token_ok(rt.settings.callback_secret, job_id,
                                                         request.args.get("token")):
        return _refused("token", 403, "bad callback token")
    with bound(job_id=job_id):  # every log line of a genuine callback names its job (and its task, once read)
        return _callback(rt, job_id)


def _callback(rt: Runtime, job_id: str) -> Any:
    limit = rt.settings.max_callback_bytes
    raw = read_body(limit)
    if raw is None:
        return _refused("too_large", 413, f"callback body over {limit} bytes")
    secret = rt.settings.kling_webhook_secret
    signed = secret is None or verify(secret, dict(request.headers), raw, tolerance=SIGNATURE_TOLERANCE_SECONDS)
    if not signed:
        log.warning("callback refused: missing, wrong or stale webhook signature", extra={"job_id": job_id})
        return _refused("signature", 401, "missing, wrong or stale webhook signature")
    task = _parse(job_id, raw)
    if not isinstance(task, KlingTask):
        return task
    recent = recent_states(current_app)
    settled = _settled(recent, job_id, task)
    if settled is not None:  # usually answered before Flask (BoundCallbacksFirst); here for a body without a length
        add(kling_task_id=settled.task_id)
        return jsonify(ok=True, applied=False, state=settled.state.value)
    # One round trip: the job's state and task, and the callback kept (`heard`) if its task is the job's bound one
    # (the checks below then pass; kept before any step: the copy the step queues may need the URL, callbacks only).
    # (BoundCallbacksFirst may have made that round trip already, for this very body: then its answer is used.)
    early = request.environ.pop(_SEEN_ENVIRON, None)
    seen = early[1] if early is not None and early[0] == raw else _read(rt, recent, job_id, task)
    if isinstance(seen, redis.RedisError):
        raise seen
    if seen.state is None:
        return _refused("unknown_job", 404, "unknown job")
    if seen.kling_task_id is None:
        return _unbound(job_id, task, signed=secret is not None)
    if seen.kling_task_id != task.task_id:
        return _refused("task_mismatch", 409, "task_id does not match this job's Kling task")
    add(kling_task_id=seen.kling_task_id)
    if _unchanged(rt, job_id, task, seen):
        return jsonify(ok=True, applied=False, state=seen.state.value)
    result = _apply(rt, recent, job_id, task)
    return jsonify(ok=True, applied=result.applied, state=result.job.state.value)


def _apply(rt: Runtime, recent: RecentStates, job_id: str, task: KlingTask) -> StepResult:
    """The step of a callback for the job's own task, read as bound to it and not a repeat: applied, remembered
    and counted (the view and BoundCallbacksFirst alike)."""
    result = apply_task_status(rt, job_id, task, source="callback")
    try:  # the step is made: what follows must not cost its answer (an error now would make it look undone)
        recent.note(job_id, result.job.kling_task_id, result.job.state)
        metrics.callback(_outcome(result, KLING_STATUS_TO_STATE[task.status]))
    except Exception:
        log.exception("callback applied; remembering or counting it failed", extra={"job_id": job_id})
    return result


def _read(rt: Runtime, recent: RecentStates, job_id: str, task: KlingTask) -> Glimpse:
    """One round trip: the job's state and task, and the callback kept (`heard`) if its task is the job's bound
    one; what it says is remembered (`recent`)."""
    seen = heard.read_and_remember(rt.redis, job_id, task, ttl_seconds=_heard_ttl(rt))
    recent.note(job_id, seen.kling_task_id, seen.state)
    return seen


def _unchanged(rt: Runtime, job_id: str, task: KlingTask, seen: Glimpse) -> bool:
    """Whether the callback is a duplicate or stale for the job as read (bound to this task, already in the state it
    reports or past it): the step would change nothing, so it is not run. What Kling billed is still recorded, as
    `apply_task_status` does first for every status, and the outcome counted."""
    to = KLING_STATUS_TO_STATE[task.status]
    if seen.state is None or seen.kling_task_id != task.task_id or step_applies(seen.state, to):
        return False
    usage.record_deduction(rt.redis, job_id, task, now=rt.clock())
    metrics.callback(_unchanged_label(seen.state, to))
    return True


def _unchanged_label(state: JobState, to: JobState) -> str:
    """duplicate (the job is already in the state the callback reports) or stale (it is past it)."""
    return "duplicate" if state is to else "stale"


def recent_states(app: Flask) -> RecentStates:
    """This process's memory of jobs' states (one per app: shared/recent.py)."""
    recent: RecentStates | None = app.extensions.get(_RECENT)
    if recent is None:
        recent = app.extensions[_RECENT] = RecentStates()
    return recent


def _settled(recent: RecentStates, job_id: str, task: KlingTask) -> Seen | None:
    """What was remembered of the job when this process can prove the callback is a repeat that changes nothing
    (`shared/recent.py`), counted as the view counts it; else None (the callback takes the full path)."""
    to = KLING_STATUS_TO_STATE[task.status]
    seen = recent.settled(job_id, task, to)
    if seen is None:
        return None
    metrics.callback(_unchanged_label(seen.state, to))
    return seen


CALLBACK_PREFIX = "/callbacks/kling/"
#: Where BoundCallbacksFirst leaves its read of the job for the view: (the body it was read for, the Glimpse), or the
#: Redis error that read met (the view answers it at once instead of waiting out a second timeout).
_SEEN_ENVIRON = "kling_relay.callback_seen"
_RECENT = "kling_relay.recent"
_JSON_HEADERS = [("Content-Type", "application/json")]


class _Answer(NamedTuple):
    """What BoundCallbacksFirst answers: the view's `{"applied", "ok", "state"}`."""

    applied: bool
    state: JobState


@functools.cache
def _answer_body(applied: bool, state: JobState) -> bytes:
    """The view's own bytes for this answer (jsonify: sorted keys, compact, a newline)."""
    return json.dumps({"ok": True, "applied": applied, "state": state.value}, separators=(",", ":"),
                      sort_keys=True).encode() + b"\n"


class BoundCallbacksFirst:
    """WSGI middleware in front of the app: a callback for a job bound to its task is answered here, before Flask
    builds a request (bench/callbacks.py: Flask's handling is most of what a repeat costs, and about a quarter of
    what a step costs). It runs the view's own checks, in the view's order and with the same functions: the job id,
    its token, the body's declared length within MAX_CALLBACK_BYTES, the webhook signature when
    KLING_WEBHOOK_SECRET is set, the task's shape and `external_task_id`. Then a repeat this process can prove
    changes nothing (`shared/recent.py`) is answered without Redis; any other is read once (`_read`) and, for the
    job's bound task, answered as the view answers it: a duplicate or stale one (the view's rule, `_unchanged`)
    changes nothing, and a step is applied (`_apply`, under the request id and the job's ids in the log, as the
    view's request hooks bind them). Anything else, every refusal, an unknown job and a job not bound yet
    included, goes on to Flask as it came (a body read here is handed on whole, with the read of the job, which
    the view then does not repeat), so its answer and its count are the view's; so does a Redis error (the view
    answers 503 without a second wait) and any failure of this path (the view does it all again: a step applied
    twice is a no-op). The answer is the view's own bytes, with `X-Request-ID` and the job id left for the access
    log, as the app's request hooks do.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.wsgi_app = app.wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get("PATH_INFO", "").startswith(CALLBACK_PREFIX):
            return self.wsgi_app(environ, start_response)
        # The request's id, kept in the environ: the view's request hook takes it too, should the view answer.
        request_id = environ["HTTP_X_REQUEST_ID"] = sane(environ.get("HTTP_X_REQUEST_ID")) or new()
        answer = None
        try:
            answer = self._answer(environ, request_id)
        except Exception:  # a bug here must not cost the callback: the view answers it, with its error handling
            log.exception("callback fast path failed; the view answers",
                          extra={"path": environ["PATH_INFO"], "request_id": request_id})
        if answer is None:
            return self.wsgi_app(environ, start_response)
        body = _answer_body(answer.applied, answer.state)
        environ[JOB_ID_ENVIRON] = environ["PATH_INFO"][len(CALLBACK_PREFIX):]
        start_response("200 OK", [*_JSON_HEADERS, ("Content-Length", str(len(body))),
                                  (REQUEST_ID_HEADER, request_id)])
        return [body]

    def _answer(self, environ: dict[str, Any], request_id: str) -> _Answer | None:
        """The answer to a callback for a job bound to its task, else None (Flask answers it)."""
        job_id = environ["PATH_INFO"][len(CALLBACK_PREFIX):]
        rt: Runtime = self.app.extensions["kling_relay"]
        checked = _checked(rt, environ, job_id)
        if checked is None:
            return None
        raw, task = checked
        recent = recent_states(self.app)
        remembered = _settled(recent, job_id, task)
        if remembered is not None:
            return _Answer(False, remembered.state)
        try:  # not remembered: one read tells a duplicate or stale one (the view's own rule, `_unchanged`)
            seen = _read(rt, recent, job_id, task)
            if seen.state is not None and _unchanged(rt, job_id, task, seen):
                return _Answer(False, seen.state)
        except redis.RedisError as exc:
            environ[_SEEN_ENVIRON] = (raw, exc)  # the view answers it as a Redis error (503), without a second wait
            return None
        environ[_SEEN_ENVIRON] = (raw, seen)  # the view need not read it again
        if seen.state is None or seen.kling_task_id != task.task_id:
            return None  # an unknown job, one not bound yet, another task: the view's
        with bound(request_id=request_id, job_id=job_id, kling_task_id=task.task_id):
            try:
                result = _apply(rt, recent, job_id, task)
            except redis.RedisError as exc:
                environ[_SEEN_ENVIRON] = (raw, exc)
                return None
        return _Answer(result.applied, result.job.state)


def _checked(rt: Runtime, environ: dict[str, Any], job_id: str) -> tuple[bytes, KlingTask] | None:
    """The body and its task when the callback passes the view's checks, in the view's order (else None: the view
    answers it, with the body left to read)."""
    if environ.get("REQUEST_METHOD") != "POST" or not valid_job_id(job_id):
        return None
    if not callback_token_ok(rt.settings.callback_secret, job_id, _token(environ.get("QUERY_STRING", ""))):
        return None
    length = environ.get("CONTENT_LENGTH") or ""
    if not (length.isascii() and length.isdigit()) or int(length) > rt.settings.max_callback_bytes:
        return None
    size = int(length)
    raw = environ["wsgi.input"].read(size)
    environ["wsgi.input"] = io.BytesIO(raw)  # handed on whole, should Flask answer after all
    if len(raw) != size:
        return None
    secret = rt.settings.kling_webhook_secret
    if secret is not None and not verify(secret, dict(EnvironHeaders(environ)), raw,  # as the view's request.headers
                                         tolerance=SIGNATURE_TOLERANCE_SECONDS):
        return None
    try:
        task = KlingTask.from_json(parse_json(raw))
    except (ValueError, TypeError):
        return None
    if task.external_task_id is not None and task.external_task_id != job_id:
        return None
    return raw, task


def _token(query: str) -> str | None:
    """The `token` of a query string, as Flask's `request.args.get("token")` reads it (the first one)."""
    if query.startswith("token=") and not any(c in query for c in "&%+"):  # the URL we gave Kling: read as it is
        return query[6:]
    return next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token"), None)


def _unbound(job_id: str, task: KlingTask, *, signed: bool) -> Any:
    """A callback for a job whose task is not recorded yet (read in full: this path is rare)."""
    rt = runtime()
    job = rt.store.get(job_id)
    if job is None:
        return _refused("unknown_job", 404, "unknown job")
    if job.kling_task_id is not None:  # bound since the first read: answer as for a bound job
        return _as_bound(job, task)
    if task.external_task_id != job_id:
        # Only a task that names this job could ever be its own: a token alone must not pass another job's
        # task off as this one's (whose video the copy would then store here).
        return _refused("task_mismatch", 409,
                        "task_info.external_task_id must name this job until its task id is known")
    _remember(job, task)
    # Kept first, then the binding read again: a worker that binds the task after this read finds the callback when
    # it looks for early ones (`submit._record`), and one that bound it before is seen here, so one of the two
    # applies the status. (Read before keeping it, the worker could bind and look in between: neither applied it,
    # and the job waited for the reconciler. Issue 11: a bench job never stored without one.)
    job = rt.store.get(job_id)
    if job is None:
        return _refused("unknown_job", 404, "unknown job")
    if job.kling_task_id is not None:
        return _as_bound(job, task)
    if heard.may_bind_from_callback(job, task, signed=signed):
        record_task(rt, job_id, task, source="callback", detail={"bound_by": "signed callback"})
        metrics.callback("applied")
        return jsonify(ok=True, applied=True, state=rt.store.require(job_id).state.value)
    return _before_task_recorded(job, task)


def _as_bound(job: Job, task: KlingTask) -> Any:
    """A callback for a job found bound on a second read: answered as for a job bound from the start."""
    if job.kling_task_id != task.task_id:
        return _refused("task_mismatch", 409, "task_id does not match this job's Kling task")
    if job.state is not JobState.STORED:  # what a stored job's callbacks said is never read again
        _remember(job, task)
    result = apply_task_status(runtime(), job.id, task, source="callback")
    metrics.callback(_outcome(result, KLING_STATUS_TO_STATE[task.status]))
    return jsonify(ok=True, applied=result.applied, state=result.job.state.value)


def _parse(job_id: str, raw: bytes) -> Any:
    """The callback's task, or the refusal to answer (an unknown job is a 404 whatever the body, as before)."""
    try:
        task = KlingTask.from_json(parse_json(raw))
    except (ValueError, TypeError) as exc:
        if runtime().store.get(job_id) is None:
            return _refused("unknown_job", 404, "unknown job")
        return _refused("malformed", 400, f"not a Kling task object: {exc}")
    if task.external_task_id is not None and task.external_task_id != job_id:
        if runtime().store.get(job_id) is None:
            return _refused("unknown_job", 404, "unknown job")
        return _refused("task_mismatch", 409, "external_task_id does not match this job")
    return task


def _heard_ttl(rt: Runtime) -> int:
    settings = rt.settings
    return int(settings.job_ttl_seconds + settings.job_deadline_seconds)


def _remember(job: Job, task: KlingTask) -> None:
    rt = runtime()
    heard.remember(rt.redis, job.id, task, ttl_seconds=_heard_ttl(rt))


def _before_task_recorded(job: Job, task: KlingTask) -> Any:
    """A callback naming this job before its task is recorded: change nothing; maybe make the job due now."""
    metrics.callback("early")
    log.info("callback before the job's task is recorded: not applied",
             extra={"job_id": job.id, "kling_status": task.status, "state": job.state.value})
    if job.terminal:
        return jsonify(ok=True, applied=False, state=job.state.value)
    if job.state is JobState.QUEUED and job.attempts.get(CREATE_SENT, 0) > 0:
        try:  # the reconciler re-sends the submit, which looks the task up first
            runtime().store.set_due(job.id, 0)
        except JobNotFound:
            pass
    return jsonify(ok=True, applied=False, state=job.state.value,
                   note="the job's Kling task is not recorded yet; the worker confirms it with Kling"), 202


def _refused(reason: str, status: int, message: str) -> Any:
    metrics.callback_refused(reason)
    return error(status, message)


def _outcome(result: StepResult, to: JobState) -> str:
    """applied; duplicate (the job is already in the state the callback reports); stale (the job is past it)."""
    return "applied" if result.applied else _unchanged_label(result.job.state, to)
