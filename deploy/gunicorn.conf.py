"""gunicorn settings for the web process (Procfile `web`, and the local stack of the demo and the tests).

Slow clients: the callback endpoint faces the internet, so a client that trickles its headers or its body must
not hold what Kling's callbacks need. The workers are gevent workers: each connection is a greenlet, so a
thousand slow connections cost a thousand small greenlets, not the worker's threads, and `/healthz` and the
callbacks keep answering. `worker_connections` (WEB_CONNECTIONS, per worker) bounds the connections, and so the
memory, of each worker; a request's head must arrive within `keepalive` seconds or the connection is closed.
gevent patches the standard library in each worker before the app is loaded, so redis-py, requests and Celery's
publisher wait cooperatively. No reverse proxy is needed for this; one in front still helps (TLS, and slow
clients then cost the proxy, not a greenlet).

Logs are JSON lines (kling_relay.webhook.gunicorn_logging.JsonLogger): gunicorn's own messages on stderr, one
access record per request on stdout, with the path but never the query string (a callback URL carries its job's
token). Request line, header count and header size are capped.

Recycling: a worker is replaced after about 50,000 requests (`max_requests`, a bound on what a slow leak could
hold), each at its own count (`max_requests_jitter`, 10%) so the workers do not restart together. A new worker
imports and builds the app again, about 0.75 s of CPU (1.2 s before the web process stopped loading boto3 and
PyJWT at start), and callbacks wait on it meanwhile: at 1,000 requests that added about 1.1 ms to each callback
(bench/callbacks.py: 2.7 ms of CPU per callback against 1.6 without recycling, and a p99 of seconds while one of
two workers starts); at 10,000, about 0.08 ms (a tenth of what a callback costs in all on a 2-vCPU host), and a
worker taking 2,000 callbacks a second was replaced every 5 s; at 50,000, under 0.02 ms. The app is not
preloaded in the master (`preload_app`), which would make a replacement a plain fork: the master would import the
app before `on_starting` names the metrics directory, so prometheus_client would choose its single-process values,
and gevent patches the standard library in each worker after the fork, too late for what the master imported (ssl,
sockets).

Metrics: the workers count in prometheus_client's multiprocess mode. The master makes a fresh directory for their
counter files when it starts (`on_starting`, before any worker is forked and so before any imports
prometheus_client), drops an exited worker's live gauges (`child_exit`) and removes the directory when it exits;
`/metrics`, whichever worker serves it, adds up every worker's files (kling_relay.shared.metrics).

Several instances: gunicorn 25.1+ opens a control socket for `gunicornc` at one fixed path per user
($XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl), so two web processes of one user on one host would
share, and take over, one socket; it is off here (nothing of this process lives on local disk but the metrics
directory, which is per master). Shutdown: SIGTERM lets each worker finish the requests in flight (a callback
being read or answered) for up to `graceful_timeout` seconds, while no new connection is accepted;
tests/e2e/test_faults_shutdown.py.
"""

import os
from typing import Any

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104 - a server binds
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "1000"))
timeout = 30
graceful_timeout = 5
control_socket_disable = True
keepalive = 5
max_requests = 50000
max_requests_jitter = 5000
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
logger_class = "kling_relay.webhook.gunicorn_logging.JsonLogger"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
accesslog = "-"
errorlog = "-"


def on_starting(server: Any) -> None:
    from kling_relay.shared import metrics_dir

    metrics_dir.prepare("web")


def child_exit(server: Any, worker: Any) -> None:
    from kling_relay.shared import metrics

    metrics.process_exited(worker.pid)


def on_exit(server: Any) -> None:
    from kling_relay.shared import metrics_dir

    path = metrics_dir.current()
    if path:
        metrics_dir.remove(path)
