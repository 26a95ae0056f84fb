"""`GET /metrics`: the web process's Prometheus metrics (its counters, added up over gunicorn's workers, and the
job store's gauges read from Redis at scrape time: `kling_relay.shared.metrics`, `kling_relay.shared.metrics_state`).

Not public by default: a scrape sends `Authorization: Bearer <one of METRICS_TOKENS>` (one of API_TOKENS while
METRICS_TOKENS is unset), else `401`. `METRICS_PUBLIC=true` serves it without a token (a private network only).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from kling_relay.shared import metrics
from kling_relay.shared.metrics_state import StateCollector
from kling_relay.shared.tokens import bearer_ok, identify
from kling_relay.webhook.common import error, runtime

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Any:
    rt = runtime()
    settings = rt.settings
    if not settings.metrics_public:
        refused = _refusal(request.headers.get("Authorization"))
        if refused is not None:
            return refused
    state = StateCollector(rt.redis, in_flight_cap=settings.kling_max_in_flight,
                           quiet_seconds=settings.reconcile_quiet_seconds)
    return Response(metrics.exposition(state), content_type=metrics.CONTENT_TYPE_LATEST)


def _refusal(authorization: str | None) -> Any:
    """None when the caller may scrape: a METRICS_TOKENS token, else an operator's (OPS_TOKENS, or any API token
    while OPS_TOKENS is unset); 403 for an app's token, 401 for anything else."""
    settings = runtime().settings
    if settings.metrics_tokens:
        allowed: bool | None = bearer_ok(authorization, settings.metrics_tokens) or None
    else:
        caller = identify(authorization, settings.api_tokens, settings.ops_tokens)
        allowed = None if caller is None else caller.ops
    if allowed:
        return None
    if allowed is False:
        return error(403, "metrics are for operators: use an OPS_TOKENS token")
    response, status = error(401, "missing or invalid bearer token")
    response.headers["WWW-Authenticate"] = 'Bearer realm="kling-relay metrics"'
    return response, status
