"""The web process: the jobs API (`/v1/jobs`), Kling's callbacks (`/callbacks/kling/<job_id>`), `/healthz`,
`/readyz`, the API's OpenAPI description (`/openapi.json`), the operators' dashboard (`/dashboard`) and
Prometheus' `/metrics` (webhook/metrics.py)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from kling_relay.shared import copy_flow, flow
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import Settings, load_settings
from kling_relay.webhook import request_ids

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    settings = settings or (runtime.settings if runtime else load_settings())
    app = Flask(__name__)
    # One byte over the largest body any view accepts: views read with read_body(), which tells "over" apart
    # from "cut at the maximum" (what Werkzeug does to a chunked body at exactly MAX_CONTENT_LENGTH).
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_request_bytes, settings.max_callback_bytes) + 1
    app.extensions["kling_relay"] = runtime or Runtime.from_settings(settings)

    from kling_relay.webhook.api import bp as api_bp
    from kling_relay.webhook.callbacks import BoundCallbacksFirst
    from kling_relay.webhook.callbacks import bp as callbacks_bp
    from kling_relay.webhook.dashboard import install as install_dashboard
    from kling_relay.webhook.metrics import bp as metrics_bp
    from kling_relay.webhook.openapi import openapi_document

    request_ids.install(app)
    app.wsgi_app = BoundCallbacksFirst(app)  # type: ignore[method-assign]  # a bound job's callbacks: before Flask
    app.register_blueprint(api_bp)
    app.register_blueprint(callbacks_bp)
    install_dashboard(app, settings)
    app.register_blueprint(metrics_bp)
    document = openapi_document(settings)

    @app.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(document)

    @app.get("/healthz")
    def healthz() -> Any:
        """Public and unauthenticated, so it names no component: the cause goes to the log, not the body."""
        rt: Runtime = app.extensions["kling_relay"]
        try:
            rt.redis.ping()
            submission = flow.status(rt.redis)["submission"]
        except Exception as exc:
            log.warning("health check failed", extra={"error": type(exc).__name__})
            response = jsonify(status="unhealthy")
            response.headers["Retry-After"] = "5"
            return response, 503
        return jsonify(status="ok", submission=submission, copy=copy_flow.state(rt.redis))

    @app.get("/livez")
    def livez() -> Any:
        """Liveness (Kubernetes' livenessProbe): 200 while this process answers HTTP, touching nothing else, so a
        Redis outage (the readiness probe's business) never gets the pod restarted."""
        return jsonify(status="alive")

    @app.get("/readyz")
    def readyz() -> Any:
        """Readiness (Kubernetes' readinessProbe): 200 while Redis answers a PING, else 503, so a pod that cannot
        record a callback or a job gets no traffic. Public like /healthz and as terse; the cause goes to the log."""
        rt: Runtime = app.extensions["kling_relay"]
        try:
            rt.redis.ping()
        except Exception as exc:
            log.warning("readiness check failed", extra={"error": type(exc).__name__})
            response = jsonify(status="unready")
            response.headers["Retry-After"] = "5"
            return response, 503
        return jsonify(status="ready")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def store_unavailable(exc: Exception) -> Any:
        # Redis is down or restarting: nothing was recorded, and the caller (Kling, a backend app) should retry.
        app.logger.warning("job store unavailable: %s", type(exc).__name__)
        response = jsonify(error="job store unavailable, try again shortly")
        response.headers["Retry-After"] = "5"
        return response, 503

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        app.logger.exception("unhandled error")
        return jsonify(error="internal error"), 500

    return app
