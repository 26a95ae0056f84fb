"""The relay's state as Prometheus gauges, read from Redis at scrape time (the web process's `/metrics` only).

Counters are counted where things happen (`kling_relay.shared.metrics`); how many jobs are in each state, how long
the queues are and whether submission is paused is what Redis says at the moment of the scrape, so these are
read then, in one pipeline of cheap calls (ZCARD, LLEN, ZCOUNT, HGET...), whichever process serves the scrape.
Served by the web process only, so that a query summing over scrape targets counts each job once.

When Redis does not answer, the scrape still succeeds: `kling_relay_redis_up` is 0 and the other gauges are
left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kling_relay.shared import keys
from kling_relay.shared.jobs_model import TERMINAL, JobState
from kling_relay.shared.queue import COPY_QUEUE, NOTIFY_QUEUE, RECONCILE_QUEUE, SUBMIT_QUEUE

log = logging.getLogger(__name__)

QUEUES = (SUBMIT_QUEUE, COPY_QUEUE, NOTIFY_QUEUE, RECONCILE_QUEUE)
PAUSE_REASONS = ("auth", "account", "budget")
_STATES = tuple(s.value for s in JobState)
_UNFINISHED = tuple(s.value for s in JobState if s not in TERMINAL)


class StateCollector(Collector):
    """Gauges of the job store and the flow control, read from `client` on each collect().

    `in_flight_cap` is KLING_MAX_IN_FLIGHT; a job is overdue when its due time passed more than `quiet_seconds`
    (RECONCILE_QUIET_SECONDS) ago: the reconciler should long have looked at it.
    """

    def __init__(self, client: redis.Redis, *, in_flight_cap: int, quiet_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._cap = in_flight_cap
        self._quiet = quiet_seconds
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        return iter(())  # gauges are read from Redis at collect time only (registering reads nothing)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kling_relay_redis_up", "Whether Redis answered the scrape's reads (1) or not (0).")
        try:
            values = self._read()
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable", extra={"error": type(exc).__name__})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _families(values, self._cap)

    def _read(self) -> dict[str, Any]:
        now = self._clock()
        pipe = self._r.pipeline(transaction=False)
        for state in _STATES:
            pipe.zcard(keys.jobs_in_state(state))
        for state in _UNFINISHED:
            pipe.zrange(keys.jobs_in_state(state), 0, 0, withscores=True)
        for queue in QUEUES:
            pipe.llen(queue)
        pipe.zcard(keys.FLOW_IN_FLIGHT)
        pipe.exists(keys.FLOW_PAUSE)
        pipe.hget(keys.FLOW_PAUSE, "reason")
        pipe.exists(keys.COPY_PAUSE)
        pipe.hlen(keys.COPY_WAITS)
        pipe.zcount(keys.JOBS_DUE, "-inf", repr(now - self._quiet))
        pipe.zcard(keys.OUTBOX)
        replies = iter(pipe.execute())
        counts = {state: int(next(replies)) for state in _STATES}
        oldest = {}
        for state in _UNFINISHED:
            first = next(replies)
            oldest[state] = max(0.0, now - float(first[0][1])) if first else 0.0
        queues = {queue: int(next(replies)) for queue in QUEUES}
        reserved, paused, pause_reason, copy_paused, copy_waiting, overdue, outbox = replies
        if paused and pause_reason not in PAUSE_REASONS:
            pause_reason = "auth"  # as flow.current_pause reads a record without a reason
        return {"counts": counts, "oldest": oldest, "queues": queues, "reserved": int(reserved),
                "pause_reason": pause_reason, "copy_paused": int(copy_paused), "copy_waiting": int(copy_waiting),
                "overdue": int(overdue), "outbox": int(outbox)}


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _families(v: dict[str, Any], cap: int) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("kling_relay_jobs", "Jobs in each state (the state indexes; expired jobs may count "
                             "until listed).", labels=["state"])
    for state, count in v["counts"].items():
        jobs.add_metric([state], count)
    yield jobs
    oldest = GaugeMetricFamily("kling_relay_job_oldest_age_seconds",
                               "Age (since creation) of the oldest job in each unfinished state; 0 when none.",
                               labels=["state"])
    for state, age in v["oldest"].items():
        oldest.add_metric([state], age)
    yield oldest
    queues = GaugeMetricFamily("kling_relay_queue_depth", "Messages waiting in each Celery queue (not yet taken "
                               "by a worker).", labels=["queue"])
    for queue, depth in v["queues"].items():
        queues.add_metric([queue], depth)
    yield queues
    in_flight = GaugeMetricFamily("kling_relay_kling_in_flight", "What counts against KLING_MAX_IN_FLIGHT: jobs "
                                  "submitted, processing, and submits holding a reservation.", labels=["kind"])
    in_flight.add_metric(["submitted"], v["counts"]["submitted"])
    in_flight.add_metric(["processing"], v["counts"]["processing"])
    in_flight.add_metric(["reserved"], v["reserved"])
    yield in_flight
    yield _gauge("kling_relay_kling_in_flight_limit", "KLING_MAX_IN_FLIGHT: most jobs at Kling at once.", cap)
    paused = GaugeMetricFamily("kling_relay_submission_paused", "Whether submission is paused (1) and why: auth, "
                               "account or budget; 0 for the other reasons.", labels=["reason"])
    for reason in PAUSE_REASONS:
        paused.add_metric([reason], 1 if v["pause_reason"] == reason else 0)
    yield paused
    yield _gauge("kling_relay_copy_paused", "Whether copying is paused (storage unusable): 1, else 0.",
                 1 if v["copy_paused"] else 0)
    yield _gauge("kling_relay_copy_waiting_jobs", "Jobs whose copy waits for the operator (a refused video host).",
                 v["copy_waiting"])
    yield _gauge("kling_relay_jobs_overdue", "Unfinished jobs whose due time passed more than "
                 "RECONCILE_QUIET_SECONDS ago: the reconciler has not looked at them.", v["overdue"])
    yield _gauge("kling_relay_outbox_pending", "State steps not yet announced (events stream, notifications).",
                 v["outbox"])
