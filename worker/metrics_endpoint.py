"""Each Celery worker's Prometheus endpoint: `http://WORKER_METRICS_HOST:WORKER_METRICS_PORT/metrics`.

Started in the worker's main process (worker/celery_app.py, on `worker_init`) before its prefork children; it
serves the counters of all of that worker's processes (multiprocess mode, `kling_relay.shared.metrics`): Kling
requests, copies, notifications, task runs, reconcile passes, throttles and rate-limit waits. The job store's
gauges are the web process's `/metrics` only. It binds 127.0.0.1 by default: a Prometheus on the same host scrapes
it; set WORKER_METRICS_HOST to a private address to scrape it from elsewhere (it has no token). A port already
taken (a second worker on the host with the same port) leaves that worker without an endpoint, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import start_http_server

from kling_relay.shared import metrics
from kling_relay.shared.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> Any:
    """Start the endpoint on a daemon thread; returns the server, or None when the address cannot be bound."""
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    try:
        server, _thread = start_http_server(port, host, registry=metrics.registry())
    except OSError as exc:
        log.warning("worker metrics endpoint not started", extra={"host": host, "port": port, "error": str(exc)})
        return None
    log.info("worker metrics endpoint started", extra={"host": host, "port": port})
    return server
