"""The operators' dashboard at `/dashboard`: server-rendered pages over `shared/overview.py`, and the ops actions.

Sign-in with one of DASHBOARD_TOKENS (else API_TOKENS); the session lives in Redis (`shared/dashboard_auth.py`)
behind a signed cookie that is HttpOnly, SameSite=Strict, scoped to /dashboard and Secure when the request came
over https. Every form carries a CSRF token, every action is a POST, and every page is escaped (Jinja autoescape)
and sent with a Content-Security-Policy that allows no inline script, `Referrer-Policy: no-referrer` and
`Cache-Control: no-store`. Tokens never appear in a URL or a log line.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Request,
    Response,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from kling_relay.shared import copy_flow, dashboard_auth, overview, usage
from kling_relay.shared.jobs import JobNotFound, JobState, StepResult
from kling_relay.shared.jobs_model import iso_utc
from kling_relay.shared.notify import EventsStream
from kling_relay.shared.ops import ActionRefused, cancel_job, retry_job
from kling_relay.shared.settings import Settings
from kling_relay.shared.validation import ValidationFailed
from kling_relay.webhook.common import runtime, valid_job_id

log = logging.getLogger(__name__)

DASHBOARD_PATH = "/dashboard"
bp = Blueprint("dashboard", __name__, url_prefix=DASHBOARD_PATH, template_folder="templates",
               static_folder="static", static_url_path="/static")

PUBLIC_ENDPOINTS = frozenset({"dashboard.signin", "dashboard.signin_post", "dashboard.static"})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src *; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, Secure whenever the request came over https (or the app is configured so).

    Only the dashboard has a session: its cookie's path is /dashboard, so no browser sends it anywhere else, and
    every other request (Kling's callbacks above all) gets Flask's null session without building the signer.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not _under_dashboard(request.path):
            return self.make_null_session(app)
        return super().open_session(app, request)

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request.is_secure or app.config["SESSION_COOKIE_SECURE"])


def _under_dashboard(path: str) -> bool:
    return path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")


def install(app: Flask, settings: Settings) -> None:
    """Register the dashboard on `app` with its session cookie settings."""
    app.secret_key = dashboard_auth.session_key(settings)
    app.config.update(SESSION_COOKIE_NAME="kr_dashboard", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_PATH=DASHBOARD_PATH,
                      SESSION_COOKIE_SECURE=settings.public_base_url.startswith("https://"),
                      PERMANENT_SESSION_LIFETIME=dashboard_auth.SESSION_SECONDS)
    app.session_interface = _SessionInterface()
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["json"] = _json
    app.register_blueprint(bp)


def _when(ts: float | str | None) -> str:
    if ts is None or ts == "":
        return "—"
    if isinstance(ts, str):
        return ts.replace("T", " ")
    return iso_utc(float(ts)).replace("T", " ")


def _json(value: Any, indent: int | None = None) -> str:
    """JSON as text (a plain str: autoescape escapes it where it is shown)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=True, default=str)


def _csrf_ok(expected: str | None) -> bool:
    given = request.form.get("csrf_token", "")
    return bool(expected) and hmac.compare_digest(given.encode(), str(expected).encode())


@bp.before_request
def require_session() -> Any:
    rt = runtime()
    g.dash = dashboard_auth.current(rt.redis, rt.settings, session.get("sid"))
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if g.dash is None:
        if request.method == "GET":
            return redirect(url_for("dashboard.signin"))
        abort(403, "sign in first")
    if request.method == "POST" and not _csrf_ok(g.dash.csrf):
        log.warning("dashboard form without a valid CSRF token", extra={"path": request.path})
        abort(403, "the form's CSRF token is missing or wrong: reload the page and try again")
    return None


@bp.after_request
def headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.errorhandler(HTTPException)
def error_page(exc: HTTPException) -> Any:
    return render_template("dashboard/error.html", code=exc.code, message=exc.description or exc.name), exc.code


@bp.context_processor
def common() -> dict[str, Any]:
    dash = g.get("dash")
    return {"csrf_token": dash.csrf if dash else session.get("pre_csrf", ""), "signed_in": dash is not None,
            "states": [s.value for s in JobState]}


# -- sign-in ----------------------------------------------------------------------------------------------------


@bp.get("/signin")
def signin() -> Any:
    if g.dash is not None:
        return redirect(url_for("dashboard.index"))
    if not session.get("pre_csrf"):
        session["pre_csrf"] = secrets.token_urlsafe(32)
    return render_template("dashboard/signin.html")


@bp.post("/signin")
def signin_post() -> Any:
    rt = runtime()
    if not _csrf_ok(session.get("pre_csrf")):
        abort(403, "the form's CSRF token is missing or wrong: reload the page and try again")
    started = dashboard_auth.sign_in(rt.redis, rt.settings, request.form.get("token", ""))
    if started is None:
        log.warning("dashboard sign-in refused", extra={"remote_addr": request.remote_addr})
        return render_template("dashboard/signin.html", refused=True), 401
    session.clear()
    session["sid"] = started.session_id
    session.permanent = True
    log.info("dashboard sign-in", extra={"token_number": started.token_number})
    return redirect(url_for("dashboard.index"))


@bp.post("/signout")
def signout() -> Any:
    dashboard_auth.sign_out(runtime().redis, session.get("sid"))
    session.clear()
    return redirect(url_for("dashboard.signin"))


# -- pages ------------------------------------------------------------------------------------------------------


@bp.get("/")
def index() -> Any:
    return render_template("dashboard/overview.html", o=overview.overview(runtime()))


@bp.get("/jobs")
def jobs() -> Any:
    rt = runtime()
    query = request.args.get("q", "").strip()[:300]
    state = request.args.get("state", "")
    if query:
        page = overview.find(rt, query)
    else:
        page = overview.jobs_page(rt, state=state or None, cursor=request.args.get("cursor"))
    return render_template("dashboard/jobs.html", page=page, query=query, state=state)


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Any:
    detail = overview.job_detail(runtime(), job_id) if valid_job_id(job_id) else None
    if detail is None:
        abort(404, "no such job")
    return render_template("dashboard/job.html", d=detail)


@bp.get("/jobs/<job_id>/images/<int:index>")
def job_image(job_id: str, index: int) -> Any:
    found = overview.request_image(runtime(), job_id, index) if valid_job_id(job_id) else None
    if found is None:
        abort(404, "no such image")
    data, media_type = found
    response = Response(data, mimetype=media_type)
    response.headers["Cache-Control"] = "private, max-age=300"
    return response


# -- actions ----------------------------------------------------------------------------------------------------


def _act(job_id: str, what: str, action: Callable[[dict[str, Any]], StepResult]) -> Any:
    if not valid_job_id(job_id):
        abort(404, "no such job")
    detail: dict[str, Any] = {"via": "dashboard", "dashboard_token": g.dash.token_number}
    reason = request.form.get("reason", "").strip()
    if reason:
        detail["reason"] = reason
    try:
        result = action(detail)
    except JobNotFound:
        abort(404, "no such job")
    except ValidationFailed as exc:
        flash(f"{what} refused: " + "; ".join(f"{p.field} {p.problem}" for p in exc.problems), "error")
    except ActionRefused as exc:
        flash(f"{what} refused: {exc.reason}", "error")
    else:
        flash(f"{what} done: the job is {result.job.state.value}", "ok")
    return redirect(url_for("dashboard.job", job_id=job_id))


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str) -> Any:
    rt = runtime()
    return _act(job_id, "retry", lambda detail: retry_job(rt.store, rt.enqueuer, job_id, detail=detail,
                                                          due_in=rt.settings.reconcile_quiet_seconds))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    rt = runtime()
    return _act(job_id, "cancel", lambda detail: cancel_job(rt.store, rt.enqueuer, job_id, detail=detail,
                                                            stream=EventsStream.of(rt.settings)))


@bp.post("/submission/resume")
def resume_submission() -> Any:
    rt = runtime()
    cleared = usage.operator_resume(rt.redis, by=f"dashboard_token:{g.dash.token_number}", now=rt.clock())
    flash("submission resumed" if cleared else "submission was not paused", "ok")
    return redirect(url_for("dashboard.index"))


@bp.post("/copy/resume")
def resume_copy() -> Any:
    rt = runtime()
    cleared = copy_flow.resume(rt.redis, by=f"dashboard_token:{g.dash.token_number}")
    flash("copying resumed" if cleared else "copying was not paused", "ok")
    return redirect(url_for("dashboard.index"))
