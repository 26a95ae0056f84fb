"""The sweep of index entries whose job expired (`JobStore.sweep`, run by each reconciler pass), on a real Redis.

Issue 11 (bounded memory): a job's hash expires JOB_TTL_SECONDS after it ends, but its entries in `kr:jobs:all`, the
terminal state indexes, its app's listing index and `kr:jobs:by_task` stayed for good (pages are read newest first,
so the lazy drop of `list()` never reached them): ~380 bytes per expired job, never returned.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from kling_relay.shared import keys
from kling_relay.shared.jobs import SWEEP_BATCH, SWEEP_SCAN_COUNT, JobState, JobStore
from kling_relay.shared.jobs_model import new_job_id
from tests.support.clock import FakeClock

S = JobState
TTL = 3600
T0 = 1_800_000_000.0
REQUEST: dict[str, Any] = {"model_name": "kling-v1-6", "prompt": "a cat surfing", "duration": "5"}
TERMINAL_INDEXES = [keys.jobs_in_state(s) for s in ("stored", "failed", "canceled")]


def finished(store: JobStore, to: JobState, *, app: str | None = None, task: str | None = None) -> str:
    job, _ = store.create(dict(REQUEST), app=app)
    if task:
        store.set_kling_task_id(job.id, task, source="worker")
    store.step(job.id, to, source="worker")
    return job.id


def places(client: redis.Redis, job_id: str, task: str | None = None, app: str | None = None) -> set[str]:
    """The indexes that still hold the job."""
    found = {k for k in [keys.JOBS_ALL, *TERMINAL_INDEXES] if client.zscore(k, job_id) is not None}
    if app and client.zscore(keys.app_jobs(app), job_id) is not None:
        found.add(keys.app_jobs(app))
    if task and client.hget(keys.JOBS_BY_TASK, task) == job_id:
        found.add(keys.JOBS_BY_TASK)
    return found


def sweep_until_done(store: JobStore, *, now: float, passes: int = 20, **kw: Any) -> int:
    removed = 0
    for _ in range(passes):
        got = store.sweep(now=now, **kw)["removed"]
        removed += got
        if got == 0:
            break
    return removed


def test_expired_jobs_leave_every_index_and_live_ones_stay(redis_client: redis.Redis) -> None:
    """Jobs that really expired (a 1 s TTL) leave `all`, their state index, their app's listing and the task-id
    index; a job of the same age kept alive by a retry, one written without a TTL, one finished later (its expiry
    still ahead) and a young one keep every entry. counts() stops counting the expired ones."""
    clock = FakeClock(T0)
    store = JobStore(redis_client, clock=clock, job_ttl_seconds=1)
    gone = [(finished(store, S.STORED, app="web", task="t-s"), "t-s", "web"),
            (finished(store, S.FAILED, task="t-f"), "t-f", None),
            (finished(store, S.CANCELED, app="web"), None, "web")]
    retried = finished(store, S.FAILED, app="web", task="t-r")
    assert store.retry(retried, source="api").applied  # no expiry any more: lives on, past its TTL
    late, _ = store.create(dict(REQUEST), app="web")
    store.set_kling_task_id(late.id, "t-late", source="worker")
    no_ttl = finished(JobStore(redis_client, clock=clock), S.STORED, app="web", task="t-none")
    clock.advance(10 * TTL)  # the same clock: everything above is old
    store.step(late.id, S.STORED, source="worker")
    redis_client.expire(keys.job(late.id), TTL)  # ended just now: expires an hour from now
    young = finished(JobStore(redis_client, clock=clock, job_ttl_seconds=TTL), S.STORED, app="web", task="t-young")
    time.sleep(1.2)
    assert all(not redis_client.exists(keys.job(job_id)) for job_id, _, _ in gone), "expired by Redis"
    assert store.counts()["stored"] == 4 and store.counts()["failed"] == 1 and store.counts()["canceled"] == 1

    assert sweep_until_done(store, now=clock.now) == 3 + 3 + 2 + 2  # all, their state's, the app's, by_task

    for job_id, task, app in gone:
        assert places(redis_client, job_id, task, app) == set(), job_id
    assert places(redis_client, retried, "t-r", "web") == {keys.JOBS_ALL, keys.app_jobs("web"), keys.JOBS_BY_TASK}
    assert redis_client.zscore(keys.jobs_in_state("queued"), retried) is not None
    for job_id, task in ((late.id, "t-late"), (no_ttl, "t-none"), (young, "t-young")):
        assert places(redis_client, job_id, task, "web") == {keys.JOBS_ALL, keys.jobs_in_state("stored"),
                                                             keys.app_jobs("web"), keys.JOBS_BY_TASK}, job_id
    assert store.counts() == {"queued": 1, "submitted": 0, "processing": 0, "generated": 0, "stored": 3,
                              "failed": 0, "canceled": 0}
    assert store.find_by_task("t-r") is not None and store.find_by_task("t-late") is not None
    assert store.sweep(now=clock.now)["removed"] == 0, "nothing left to remove"


def test_only_entries_older_than_the_ttl_are_candidates(redis_client: redis.Redis) -> None:
    """An entry created less than the TTL ago is not examined (its job cannot have expired by TTL); once the TTL
    has passed since its creation, it is, and removed if its job is gone."""
    clock = FakeClock(T0)
    store = JobStore(redis_client, clock=clock, job_ttl_seconds=TTL)
    job_id = finished(store, S.STORED)
    redis_client.delete(keys.job(job_id))  # as if expired (examined only by the sweep, never read here)
    assert store.sweep(now=T0 + TTL - 1) == {"examined": 0, "removed": 0}
    assert places(redis_client, job_id) == {keys.JOBS_ALL, keys.jobs_in_state("stored")}
    assert store.sweep(now=T0 + TTL + 1)["removed"] == 2
    assert places(redis_client, job_id) == set()


def gone_entries(client: redis.Redis, count: int, *, at: float = T0, live: bool = False) -> list[str]:
    """`count` entries in `all`, `stored` and the task-id index (their jobs gone unless `live`), written directly."""
    ids = [new_job_id(at) for _ in range(count)]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        for index in (keys.JOBS_ALL, keys.jobs_in_state("stored")):
            pipe.zadd(index, {job_id: at})
        pipe.hset(keys.JOBS_BY_TASK, f"task-{job_id}", job_id)
        if live:
            pipe.hset(keys.job(job_id), mapping={"state": "stored", "created_at": repr(at)})
    pipe.execute()
    return ids


def test_the_work_of_one_sweep_is_bounded(redis_client: redis.Redis) -> None:
    """2.5 batches of expired jobs: one sweep examines at most SWEEP_BATCH entries of each sorted-set index and an
    HSCAN step of about SWEEP_SCAN_COUNT fields; the next sweeps go on from there until all are gone."""
    n = SWEEP_BATCH * 5 // 2
    gone_entries(redis_client, n)
    store = JobStore(redis_client, clock=FakeClock(T0 + 10 * TTL), job_ttl_seconds=TTL)
    first = store.sweep()
    assert redis_client.zcard(keys.JOBS_ALL) == n - SWEEP_BATCH
    assert redis_client.zcard(keys.jobs_in_state("stored")) == n - SWEEP_BATCH
    scanned = n - redis_client.hlen(keys.JOBS_BY_TASK)
    assert SWEEP_SCAN_COUNT // 2 <= scanned <= SWEEP_SCAN_COUNT * 3 // 2  # COUNT is a hint, roughly kept
    assert first == {"examined": 2 * SWEEP_BATCH + scanned, "removed": 2 * SWEEP_BATCH + scanned}
    passes = 1
    while redis_client.exists(keys.JOBS_ALL, keys.jobs_in_state("stored"), keys.JOBS_BY_TASK):
        assert store.sweep()["removed"] > 0
        passes += 1
        assert passes < 10
    assert passes in (3, 4)
    assert not redis_client.exists(keys.SWEEP), "every sweep reached its end: nothing kept"


def test_live_old_entries_do_not_hold_the_sweep_back(redis_client: redis.Redis) -> None:
    """A batch's worth of old jobs that are still alive (retried, no TTL) ahead of expired ones: the next sweep
    resumes after them instead of examining them again, then starts over from the oldest once at the end."""
    live = gone_entries(redis_client, 30, at=T0, live=True)
    gone = gone_entries(redis_client, 20, at=T0 + 1)
    store = JobStore(redis_client, clock=FakeClock(T0 + 10 * TTL), job_ttl_seconds=TTL)
    # the 30 live ones in each sorted set; the task-id index is small (a listpack): HSCAN returns it whole
    assert store.sweep(batch=30, scan_count=10) == {"examined": 30 + 30 + 50, "removed": 20}
    assert redis_client.zcard(keys.JOBS_ALL) == 50
    while store.sweep(batch=30, scan_count=10)["removed"]:
        pass
    assert set(redis_client.zrange(keys.JOBS_ALL, 0, -1)) == set(live)
    assert set(redis_client.hvals(keys.JOBS_BY_TASK)) == set(live)
    assert not set(gone) & set(redis_client.zrange(keys.jobs_in_state("stored"), 0, -1))
    # at the end, the sweep starts again from the oldest: the live ones are examined again, never removed
    # (the last sweep stopped after them: the next finds nothing further, the one after starts again)
    assert [store.sweep(batch=30, scan_count=10) for _ in range(2)] == [
        {"examined": 0 + 0 + 30, "removed": 0}, {"examined": 30 + 30 + 30, "removed": 0}]


def test_the_task_index_is_scanned_on_from_where_the_last_sweep_stopped(redis_client: redis.Redis) -> None:
    """The task-id index (no scores) is walked with HSCAN, its cursor kept in `kr:sweep` between sweeps: entries of
    expired jobs anywhere in a large index are removed within one cycle of small steps, live ones never."""
    live = gone_entries(redis_client, 2000, live=True)
    gone = gone_entries(redis_client, 20)
    redis_client.delete(keys.JOBS_ALL, keys.jobs_in_state("stored"))
    store = JobStore(redis_client, clock=FakeClock(T0 + 10 * TTL), job_ttl_seconds=TTL)
    steps = 0
    while redis_client.hlen(keys.JOBS_BY_TASK) > len(live):
        store.sweep(scan_count=100)
        steps += 1
        assert steps <= 40, "one cycle: about 2048 buckets, 100 a step"
    assert set(redis_client.hvals(keys.JOBS_BY_TASK)) == set(live) and len(gone) == 20


def test_many_entries_with_one_created_at(redis_client: redis.Redis) -> None:
    """Entries with the same score (created in the same instant): the sweep's place is a score and how many entries
    at it were kept, so it neither loops on them nor skips any."""
    mixed = gone_entries(redis_client, 25, at=T0, live=True) + gone_entries(redis_client, 25, at=T0)
    store = JobStore(redis_client, clock=FakeClock(T0 + 10 * TTL), job_ttl_seconds=TTL)
    removed = [store.sweep(batch=7, scan_count=5)["removed"] for _ in range(12)]
    assert sum(removed) == 25 * 3 and removed[-1] == 0
    assert redis_client.zcard(keys.JOBS_ALL) == 25 and len(mixed) == 50


def test_app_listings_are_swept_and_forgotten_once_empty(redis_client: redis.Redis) -> None:
    """The sweep finds an app's listing through `kr:sweep:apps` (written by the create), or through the app names it
    is given (the configured tokens: listings written before the sweep existed); an emptied listing leaves the
    set."""
    clock = FakeClock(T0)
    store = JobStore(redis_client, clock=clock, job_ttl_seconds=TTL)
    job_id = finished(store, S.STORED, app="web")
    assert redis_client.smembers(keys.SWEEP_APPS) == {"web"}
    redis_client.delete(keys.job(job_id))
    redis_client.zadd(keys.app_jobs("legacy"), {"job_01HZZZZZZZZZZZZZZZZZZZZZZZ": T0})  # an older release's
    redis_client.srem(keys.SWEEP_APPS, "legacy")
    clock.advance(2 * TTL)
    store.sweep()
    assert not redis_client.exists(keys.app_jobs("web")) and redis_client.smembers(keys.SWEEP_APPS) == set()
    assert redis_client.exists(keys.app_jobs("legacy")), "not known to the sweep"
    store.sweep(apps=["legacy"])
    assert not redis_client.exists(keys.app_jobs("legacy"))


def test_without_a_ttl_every_entry_is_a_candidate(redis_client: redis.Redis) -> None:
    """With no JOB_TTL a job never expires, but a job written while one was set still may: every entry is
    examined (bounded as ever), only gone jobs' entries removed."""
    store = JobStore(redis_client, clock=FakeClock(T0))
    keep = finished(store, S.STORED, task="t1")
    drop = finished(store, S.CANCELED, task="t2")
    redis_client.delete(keys.job(drop))
    assert store.sweep(now=T0 + 1)["removed"] == 3
    assert places(redis_client, keep, "t1") == {keys.JOBS_ALL, keys.jobs_in_state("stored"), keys.JOBS_BY_TASK}
    assert places(redis_client, drop, "t2") == set()


@pytest.mark.parametrize("bad", [{"batch": 0}, {"scan_count": 0}])
def test_bounds_must_be_positive(redis_client: redis.Redis, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        JobStore(redis_client).sweep(**bad)
