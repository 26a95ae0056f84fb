"""Prometheus metrics: every counter and histogram the relay exports, defined once, behind small functions.

The domain code calls the functions (`transition`, `kling_request`, `copied`, `callback`, ...), never
prometheus_client itself. Each process group counts in prometheus_client's multiprocess mode (see
`kling_relay.shared.metrics_dir`): gunicorn's workers and Celery's prefork children write their counters to files
in one directory per group, and a scrape adds them up, so a counter is right whichever process counted. Where
they are served: the web process's `/metrics` (its own counters, plus the job store's gauges read from Redis at
scrape time: `kling_relay.shared.metrics_state`), and each Celery worker's endpoint on `WORKER_METRICS_PORT`
(the counters of that worker's processes: Kling requests, copies, notifications, reconcile passes, ...).
A process without `PROMETHEUS_MULTIPROC_DIR` (a test, the in-process client) counts in its own memory.

Names follow Prometheus' conventions: `kling_relay_` first, `_total` on counters, base units (`_seconds`,
`_bytes`); label values come from short fixed sets (states, endpoints, outcomes, codes), never from a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.registry import Collector

from kling_relay.shared import metrics_dir

__all__ = ["CONTENT_TYPE_LATEST", "exposition", "registry"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GENERATION_BUCKETS = (15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)
_COPY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

JOB_TRANSITIONS = Counter(
    "kling_relay_job_transitions_total", "Job state steps applied, by the state left and the state entered.",
    ["from_state", "to_state"], registry=None)
KLING_REQUESTS = Counter(
    "kling_relay_kling_requests_total",
    "Requests sent to Kling, by endpoint (create, query, list) and answer code: Kling's code (0 = success), "
    "http_<status> for an answer without one, no_answer when none arrived.",
    ["endpoint", "code"], registry=None)
KLING_LATENCY = Histogram(
    "kling_relay_kling_request_duration_seconds",
    "Time of each request to Kling until its answer was read (a rate-limit wait of at most a second included).",
    ["endpoint"], buckets=_LATENCY_BUCKETS, registry=None)
GENERATION = Histogram(
    "kling_relay_generation_duration_seconds", "Time from a job's submitted step to its generated step.",
    buckets=_GENERATION_BUCKETS, registry=None)
COPY_BYTES = Counter("kling_relay_copy_bytes_total", "Bytes of video stored in S3 by finished copies.",
                     registry=None)
COPY_DURATION = Histogram(
    "kling_relay_copy_duration_seconds", "Time of each finished copy, download and upload of every video.",
    buckets=_COPY_BUCKETS, registry=None)
CALLBACKS = Counter(
    "kling_relay_callbacks_total",
    "Kling callbacks by outcome: applied, duplicate (the job is already in that state), stale (the job is past "
    "it), early (before the job's task is recorded), refused.",
    ["outcome"], registry=None)
CALLBACKS_REFUSED = Counter(
    "kling_relay_callbacks_refused_total",
    "Kling callbacks refused, by reason: token, signature, too_large, unknown_job, malformed, task_mismatch.",
    ["reason"], registry=None)
NOTIFICATIONS = Counter(
    "kling_relay_notifications_total",
    "Deliveries to a job's notify_url by outcome: delivered, retry (failed, tried again later), gave_up.",
    ["outcome"], registry=None)
TASK_RUNS = Counter(
    "kling_relay_task_runs_total",
    "Celery task runs by task (submit, copy, notify, reconcile) and outcome (the step's, retry or error).",
    ["task", "outcome"], registry=None)
RECONCILE_PASSES = Counter(
    "kling_relay_reconcile_passes_total",
    "Reconciler passes: ran, or locked (another pass held the lock and this one did nothing).",
    ["result"], registry=None)
RECONCILE_JOBS = Counter(
    "kling_relay_reconcile_jobs_total",
    "What reconciler passes did to jobs: due, resubmitted, recopied, polled, advanced, timed_out, waiting, "
    "missing, errors, announced.",
    ["action"], registry=None)
RECONCILE_PROBES = Counter(
    "kling_relay_reconcile_probes_total",
    "Probes of a paused submission (kind submission: Kling) or copy (kind copy: S3), by result.",
    ["kind", "result"], registry=None)
RECONCILE_DURATION = Histogram(
    "kling_relay_reconcile_pass_duration_seconds", "Time of each reconciler pass that ran.",
    buckets=_PASS_BUCKETS, registry=None)
RECONCILE_LAST = Gauge(
    "kling_relay_reconcile_last_pass_timestamp_seconds", "Unix time at which the last reconciler pass ended.",
    registry=None, multiprocess_mode="max")
THROTTLES = Counter(
    "kling_relay_throttles_total",
    "Steps put off without using an attempt, by step (submit, copy) and cause: in_flight_cap, rate_limit, "
    "kling_busy (Kling's 1302/1303), paused.",
    ["step", "cause"], registry=None)
RATE_LIMIT_WAITS = Counter(
    "kling_relay_rate_limit_waits_total",
    "Kling requests that met the shared rate limit: waited (then sent), refused (rescheduled, not sent).",
    ["outcome"], registry=None)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "kling_relay_rate_limit_wait_seconds_total", "Seconds requests waited for a slot of the shared rate limit.",
    registry=None)

_ALL: tuple[Collector, ...] = (
    JOB_TRANSITIONS, KLING_REQUESTS, KLING_LATENCY, GENERATION, COPY_BYTES, COPY_DURATION, CALLBACKS,
    CALLBACKS_REFUSED, NOTIFICATIONS, TASK_RUNS, RECONCILE_PASSES, RECONCILE_JOBS, RECONCILE_PROBES,
    RECONCILE_DURATION, RECONCILE_LAST, THROTTLES, RATE_LIMIT_WAITS, RATE_LIMIT_WAIT_SECONDS,
)

_RECONCILE_ACTIONS = ("due", "resubmitted", "recopied", "polled", "advanced", "timed_out", "waiting", "missing",
                      "errors", "announced", "swept")

_PROBE_RESULTS = {  # ReconcileReport.probe and .copy_probe
    "submission": ("resumed", "trial", "still_failing", "error", "rate_limited", "budget_lifted", "budget_holds"),
    "copy": ("resumed", "still_failing", "error"),
}


def _start_at_zero() -> None:
    """Create the series of the fixed label sets at 0 in this process, so that each is in every scrape from the
    start (a rate over a series that appears only at its first event misses that event; dashboards and alerts
    find every name)."""
    for outcome in ("applied", "duplicate", "stale", "early", "refused"):
        CALLBACKS.labels(outcome)
    for reason in ("token", "signature", "too_large", "unknown_job", "malformed", "task_mismatch"):
        CALLBACKS_REFUSED.labels(reason)
    for outcome in ("delivered", "retry", "gave_up"):
        NOTIFICATIONS.labels(outcome)
    for step in ("submit", "copy"):
        for cause in ("in_flight_cap", "rate_limit", "kling_busy", "paused"):
            THROTTLES.labels(step, cause)
    for outcome in ("waited", "refused"):
        RATE_LIMIT_WAITS.labels(outcome)
    for result in ("ran", "locked"):
        RECONCILE_PASSES.labels(result)
    for action in _RECONCILE_ACTIONS:
        RECONCILE_JOBS.labels(action)
    for kind, results in _PROBE_RESULTS.items():
        for result in results:
            RECONCILE_PROBES.labels(kind, result)
    for endpoint in ("create", "query", "list"):
        KLING_REQUESTS.labels(endpoint, "0")
        KLING_LATENCY.labels(endpoint)


_start_at_zero()


# -- what the domain code calls ----------------------------------------------------------------------------------

def transition(from_state: str, to_state: str) -> None:
    JOB_TRANSITIONS.labels(from_state, to_state).inc()


def kling_request(endpoint: str, code: str, seconds: float) -> None:
    KLING_REQUESTS.labels(endpoint, code).inc()
    KLING_LATENCY.labels(endpoint).observe(seconds)


def generated(seconds: float) -> None:
    GENERATION.observe(max(0.0, seconds))


def copied(nbytes: int, seconds: float) -> None:
    COPY_BYTES.inc(nbytes)
    COPY_DURATION.observe(max(0.0, seconds))


_CALLBACK_OUTCOMES: dict[str, Counter] = {}


def callback(outcome: str) -> None:
    counter = _CALLBACK_OUTCOMES.get(outcome)
    if counter is None:  # each outcome's child made once: labels() costs more than the count (every callback)
        counter = _CALLBACK_OUTCOMES[outcome] = CALLBACKS.labels(outcome)
    counter.inc()


def callback_refused(reason: str) -> None:
    CALLBACKS.labels("refused").inc()
    CALLBACKS_REFUSED.labels(reason).inc()


def notification(outcome: str) -> None:
    NOTIFICATIONS.labels(outcome).inc()


def task_run(task: str, outcome: str) -> None:
    TASK_RUNS.labels(task, outcome).inc()


def throttled(step: str, cause: str) -> None:
    THROTTLES.labels(step, cause).inc()


def rate_limit_waited(seconds: float) -> None:
    RATE_LIMIT_WAITS.labels("waited").inc()
    RATE_LIMIT_WAIT_SECONDS.inc(seconds)


def rate_limit_refused() -> None:
    RATE_LIMIT_WAITS.labels("refused").inc()


def reconcile_pass(summary: Mapping[str, Any], *, seconds: float, ended_at: float) -> None:
    """Count one pass from its report's summary (`ReconcileReport.summary()`: counts per action, probe results)."""
    if not summary.get("ran", True):
        RECONCILE_PASSES.labels("locked").inc()
        return
    RECONCILE_PASSES.labels("ran").inc()
    for action in _RECONCILE_ACTIONS:
        count = int(summary.get(action) or 0)
        if count:
            RECONCILE_JOBS.labels(action).inc(count)
    for kind, key in (("submission", "probe"), ("copy", "copy_probe")):
        if summary.get(key):
            RECONCILE_PROBES.labels(kind, str(summary[key])).inc()
    RECONCILE_DURATION.observe(max(0.0, seconds))
    RECONCILE_LAST.set(ended_at)


# -- exposition --------------------------------------------------------------------------------------------------

def registry(*extra: Collector) -> CollectorRegistry:
    """A registry of this process group's metrics (every process's files in multiprocess mode, else this
    process's own), plus `extra` collectors (the job store's gauges)."""
    reg = CollectorRegistry(auto_describe=True)
    if metrics_dir.current():
        _multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    else:
        for collector in _ALL:
            reg.register(collector)
    for collector in extra:
        reg.register(collector)
    return reg


def exposition(*extra: Collector) -> bytes:
    """The text a scrape gets (Prometheus text format, `CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry(*extra))


def process_exited(pid: int) -> None:
    """A worker process of this group exited: drop its files of live gauges (its counters stay counted)."""
    if metrics_dir.current():
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
