"""Cheap per-minute counters of finished jobs, for the dashboard's chart: never a scan of the jobs.

When a pipeline step takes a job to `stored` or `failed` (`pipeline.common.finished`, called once per applied
step), `count_finished` adds one to `kr:stats:<state>:<minute>` (and, for a failure, to its reason in
`kr:stats:failed_reasons:<minute>`), the minute being Unix seconds // 60 (UTC); every counter expires two hours
after its minute began. `per_minute` and `failed_reasons` read the last hour: a fixed number of keys.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis

from kling_relay.shared import keys

STATES = ("stored", "failed")
KEEP_SECONDS = 2 * 3600
WINDOW_MINUTES = 60


def minute_of(ts: float) -> int:
    return int(ts // 60)


def count_finished(client: redis.Redis, state: str, *, reason: str | None = None, now: float | None = None) -> None:
    """Count one job entering `state` (stored or failed) now; `reason`: the failure's reason."""
    if state not in STATES:
        return
    minute = minute_of(time.time() if now is None else now)
    pipe = client.pipeline(transaction=False)
    pipe.incr(keys.stats_count(state, minute))
    pipe.expire(keys.stats_count(state, minute), KEEP_SECONDS)
    if state == "failed":
        name = keys.stats_failed_reasons(minute)
        pipe.hincrby(name, (reason or "unknown")[:64], 1)
        pipe.expire(name, KEEP_SECONDS)
    pipe.execute()


def per_minute(client: redis.Redis, *, now: float | None = None,
               minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
    """`{"minutes": [the first minute's Unix seconds, ...], "stored": [...], "failed": [...]}`, oldest first, the
    last entry being the current (partial) minute. One MGET per state."""
    last = minute_of(time.time() if now is None else now)
    window = list(range(last - minutes + 1, last + 1))
    out: dict[str, Any] = {"minutes": [m * 60 for m in window]}
    for state in STATES:
        raw = cast(list[str | None], client.mget([keys.stats_count(state, m) for m in window]))
        out[state] = [int(v or 0) for v in raw]
    return out


def failed_reasons(client: redis.Redis, *, now: float | None = None,
                   minutes: int = WINDOW_MINUTES) -> list[tuple[str, int]]:
    """Failures in the last `minutes` by reason, most first (one pipelined HGETALL per minute)."""
    last = minute_of(time.time() if now is None else now)
    pipe = client.pipeline(transaction=False)
    for m in range(last - minutes + 1, last + 1):
        pipe.hgetall(keys.stats_failed_reasons(m))
    totals: dict[str, int] = {}
    for h in pipe.execute():
        for reason, count in cast(dict[str, str], h).items():
            totals[reason] = totals.get(reason, 0) + int(count)
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))
