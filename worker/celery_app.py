"""Entry shim for `celery --quiet -A kling_relay.worker.celery_app worker|beat` (Procfile); nothing imports it.

Logs are JSON lines on stderr, like every other process of the relay: Celery's own loggers, the task logger,
warnings (Celery's "running as root" among them) and anything printed to stdout (as `celery.redirected`, the
way Celery redirects it) all go through kling_relay.shared.logs. `--quiet` leaves out the start-up banner; the
shutdown notices Celery writes straight to the terminal become records too. Celery's lines about a relay task
carry its `job_id` (worker/log_fields.py). A bad setting stops the process with
one record naming every problem.

Metrics: the worker's processes count in prometheus_client's multiprocess mode, in a fresh directory made here
before anything imports prometheus_client (`metrics_dir.prepare`, removed when the main process exits); the main
process serves them on WORKER_METRICS_PORT (worker/metrics_endpoint.py).
"""

import logging
import os
import sys
from typing import Any

import celery.apps.worker as celery_worker
from celery import signals
from celery.utils.log import LoggingProxy

from kling_relay.shared import metrics_dir
from kling_relay.shared.logs import configure_logging, json_line
from kling_relay.shared.settings import SettingsError, load_settings

metrics_dir.prepare("worker")  # before the tasks import prometheus_client (it reads the directory at import)

from kling_relay.shared import metrics  # noqa: E402 - after prepare(), see above
from kling_relay.worker import log_fields, metrics_endpoint  # noqa: E402
from kling_relay.worker.tasks import create_worker_app  # noqa: E402

log = logging.getLogger("kling_relay.worker")


@signals.setup_logging.connect
def keep_json_logs(loglevel: Any = None, **kwargs: Any) -> None:
    """With a receiver here Celery configures no handler of its own (no plain-text task logger); LOG_LEVEL, when
    set, wins over `--loglevel`."""
    configure_logging(os.environ.get("LOG_LEVEL") or loglevel or None)
    log_fields.install()
    sys.stdout = LoggingProxy(logging.getLogger("celery.redirected"), logging.WARNING)


def _say(msg: str, f: Any = None) -> None:
    """Celery's `worker: Warm shutdown (MainProcess)` and the like, as one JSON record on stderr. Called from
    signal handlers, so it writes the line with one os.write, as Celery does, not through `logging`."""
    try:
        os.write(2, (json_line(msg.strip(), level="warning", logger="celery.worker") + "\n").encode())
    except OSError:
        pass


celery_worker.safe_say = _say  # read from the module at each call, so every shutdown notice goes through _say

configure_logging()
log_fields.install()
try:
    settings = load_settings()
    app = create_worker_app(settings)
except SettingsError as exc:
    log.critical("invalid configuration", extra={"problems": exc.problems})
    raise SystemExit(2) from None


@signals.worker_init.connect
def serve_metrics(**kwargs: Any) -> None:
    """The worker's main process (not beat) serves its processes' metrics."""
    metrics_endpoint.serve(settings)


@signals.worker_process_shutdown.connect
def forget_process(pid: int | None = None, **kwargs: Any) -> None:
    """A prefork child is going: its live gauges stop counting (its counters stay)."""
    if pid is not None:
        metrics.process_exited(pid)
