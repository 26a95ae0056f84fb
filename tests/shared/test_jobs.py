"""The job store against a real redis-server: monotonic steps, idempotent creates, indexes, the due index."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import redis

from kling_relay.shared.jobs import (
    TERMINAL,
    IdempotencyConflict,
    InvalidCursor,
    Job,
    JobNotFound,
    JobState,
    JobStore,
)
from tests.support.bulk_jobs import copy_job
from tests.support.clock import FakeClock

S = JobState
IMAGE_B64 = "iVBORw0KGgoAAAANSUhEUgAAASwAAAEsCAIAAAD2HxkiAAAAsecretpixels" * 4
REQUEST: dict[str, Any] = {
    "model_name": "kling-v1-6",
    "image_list": [{"image": IMAGE_B64}, {"image": "https://img.example/a.png"}],
    "prompt": "a cat surfing",
    "mode": "std",
    "duration": "5",
    "aspect_ratio": "16:9",
}

# What a step may do, written out rather than derived from the store's own rank table.
ALLOWED: dict[JobState, set[JobState]] = {
    S.QUEUED: {S.SUBMITTED, S.PROCESSING, S.GENERATED, S.STORED, S.FAILED, S.CANCELED},
    S.SUBMITTED: {S.PROCESSING, S.GENERATED, S.STORED, S.FAILED, S.CANCELED},
    S.PROCESSING: {S.GENERATED, S.STORED, S.FAILED, S.CANCELED},
    S.GENERATED: {S.STORED, S.FAILED, S.CANCELED},
    S.STORED: set(),
    S.FAILED: set(),
    S.CANCELED: set(),
}
# How to reach each state from queued, one applied step at a time.
PATH: dict[JobState, list[JobState]] = {
    S.QUEUED: [],
    S.SUBMITTED: [S.SUBMITTED],
    S.PROCESSING: [S.SUBMITTED, S.PROCESSING],
    S.GENERATED: [S.SUBMITTED, S.PROCESSING, S.GENERATED],
    S.STORED: [S.SUBMITTED, S.PROCESSING, S.GENERATED, S.STORED],
    S.FAILED: [S.SUBMITTED, S.FAILED],
    S.CANCELED: [S.CANCELED],
}


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture()
def store(redis_client: redis.Redis, clock: FakeClock) -> JobStore:
    return JobStore(redis_client, clock=clock)


def make_job(store: JobStore, state: JobState = S.QUEUED, **create: Any) -> Job:
    job, created = store.create(dict(REQUEST), **create)
    assert created
    for to in PATH[state]:
        assert store.step(job.id, to, source="worker").applied
    return store.require(job.id)


def index_members(r: redis.Redis, state: JobState) -> set[str]:
    return set(r.zrange(f"kr:jobs:state:{state.value}", 0, -1))


# --- state machine -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start", list(S))
@pytest.mark.parametrize("to", list(S))
def test_every_transition_is_applied_or_a_silent_no_op(store: JobStore, redis_client: redis.Redis,
                                                         clock: FakeClock, start: JobState, to: JobState) -> None:
    job = make_job(store, start, due_in=60)
    before_events = store.events(job.id)
    clock.advance(5)

    result = store.step(job.id, to, source="callback", detail={"kling_status": "x"})

    after = store.require(job.id)
    assert result.from_state is start
    assert result.job == after
    if to in ALLOWED[start]:
        assert result.applied
        assert after.state is to
        assert after.updated_at == clock.now
        events = store.events(job.id)
        assert len(events) == len(before_events) + 1
        assert events[-1].as_dict()["from"] == start.value
        assert (events[-1].from_state, events[-1].to_state, events[-1].source) == (start, to, "callback")
        assert events[-1].at == clock.now and events[-1].detail == {"kling_status": "x"}
        assert job.id in index_members(redis_client, to)
        assert job.id not in index_members(redis_client, start)
    else:
        assert not result.applied
        assert after == job
        assert store.events(job.id) == before_events
        assert job.id in index_members(redis_client, start)
    others = [s for s in S if s is not after.state]
    assert all(job.id not in index_members(redis_client, s) for s in others)
    assert redis_client.zscore("kr:jobs:all", job.id) == job.created_at


def test_a_step_applied_twice_changes_nothing_the_second_time(store: JobStore) -> None:
    job = make_job(store, S.SUBMITTED)
    first = store.step(job.id, S.PROCESSING, source="callback")
    second = store.step(job.id, S.PROCESSING, source="callback")
    assert first.applied and not second.applied
    assert second.from_state is S.PROCESSING and second.job.state is S.PROCESSING
    assert [e.to_state for e in store.events(job.id)] == ["queued", "submitted", "processing"]


def test_a_late_processing_callback_after_generated_is_a_no_op(store: JobStore) -> None:
    job = make_job(store, S.GENERATED)
    result = store.step(job.id, S.PROCESSING, source="callback")
    assert not result.applied and result.job.state is S.GENERATED
    assert store.events(job.id)[-1].to_state == "generated"


@pytest.mark.parametrize("start", [S.QUEUED, S.SUBMITTED, S.PROCESSING, S.GENERATED])
def test_failed_from_any_live_state_keeps_the_error(store: JobStore, start: JobState) -> None:
    job = make_job(store, start)
    error = {"reason": "kling_rejected:1301", "code": 1301, "message": "content safety"}
    result = store.step(job.id, S.FAILED, source="worker", set_fields={"error": error})
    assert result.applied and result.job.state is S.FAILED and result.job.error == error


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_nothing_leaves_a_terminal_state(store: JobStore, terminal: JobState) -> None:
    job = make_job(store, terminal)
    for to in S:
        assert not store.step(job.id, to, source="reconciler").applied
    assert store.require(job.id).state is terminal


def test_only_from_narrows_the_allowed_start_states(store: JobStore) -> None:
    job = make_job(store, S.SUBMITTED)
    blocked = store.step(job.id, S.GENERATED, source="worker", only_from=[S.PROCESSING])
    assert not blocked.applied and blocked.job.state is S.SUBMITTED
    nothing = store.step(job.id, S.GENERATED, source="worker", only_from=[])
    assert not nothing.applied
    allowed = store.step(job.id, S.GENERATED, source="worker", only_from=[S.SUBMITTED, S.PROCESSING])
    assert allowed.applied and allowed.job.state is S.GENERATED


def test_set_fields_are_written_only_with_an_applied_step(store: JobStore) -> None:
    job = make_job(store, S.GENERATED)
    videos = [{"bucket": "b", "key": f"2026/01/01/{job.id}/video.mp4", "sha256": "ab", "bytes": 10,
               "duration": "5.1"}]
    stored = store.step(job.id, S.STORED, source="worker", set_fields={"videos": videos})
    assert stored.applied and stored.job.videos == videos
    ignored = store.step(job.id, S.FAILED, source="worker", set_fields={"error": {"reason": "late"}})
    assert not ignored.applied
    assert store.require(job.id).error is None and store.require(job.id).videos == videos


def test_step_rejects_unknown_fields_sources_and_states(store: JobStore) -> None:
    job = make_job(store)
    with pytest.raises(ValueError, match="cannot set"):
        store.step(job.id, S.SUBMITTED, source="worker", set_fields={"state": "stored"})
    with pytest.raises(ValueError, match="source"):
        store.step(job.id, S.SUBMITTED, source="somebody")
    with pytest.raises(ValueError):
        store.step(job.id, "nonsense", source="worker")  # type: ignore[arg-type]
    assert store.require(job.id) == job and len(store.events(job.id)) == 1


def test_unknown_job(store: JobStore, redis_client: redis.Redis) -> None:
    missing = "job_01MISSINGMISSINGMISSING00"
    assert store.get(missing) is None
    assert store.events(missing) == []
    calls: list[Callable[[], object]] = [
        lambda: store.require(missing),
        lambda: store.step(missing, S.SUBMITTED, source="worker"),
        lambda: store.retry(missing, source="api"),
        lambda: store.note(missing, source="worker", detail={}),
        lambda: store.bump_attempt(missing, "submit"),
        lambda: store.set_kling_task_id(missing, "t", source="worker"),
        lambda: store.set_due(missing, 5),
    ]
    for call in calls:
        with pytest.raises(JobNotFound):
            call()
    assert redis_client.keys("*") == []  # nothing was created on the way


# --- retry ----------------------------------------------------------------------------------------------------

def test_retry_puts_a_failed_job_back_to_queued(store: JobStore, redis_client: redis.Redis,
                                                clock: FakeClock) -> None:
    job = make_job(store, S.SUBMITTED)
    store.bump_attempt(job.id, "submit")
    store.bump_attempt(job.id, "submit")
    error = {"reason": "submit_exhausted", "code": None, "message": "gave up"}
    store.step(job.id, S.FAILED, source="worker", set_fields={"error": error, "kling_task_id": "kt-1"})
    clock.advance(60)

    result = store.retry(job.id, source="api", due_in=30)

    assert result.applied and result.from_state is S.FAILED
    assert result.job.state is S.QUEUED and result.job.error is None and result.job.attempts == {}
    assert result.job.kling_task_id == "kt-1"
    last = store.events(job.id)[-1]
    assert (last.from_state, last.to_state, last.source) == ("failed", "queued", "api")
    assert last.detail == {"previous_error": error}
    assert index_members(redis_client, S.QUEUED) == {job.id}
    assert index_members(redis_client, S.FAILED) == set()
    assert store.due(now=clock.now + 30) == [job.id]


@pytest.mark.parametrize("state", [s for s in S if s is not S.FAILED])
def test_retry_is_a_no_op_outside_failed(store: JobStore, state: JobState) -> None:
    job = make_job(store, state)
    result = store.retry(job.id, source="api")
    assert not result.applied and result.job == job
    assert len(store.events(job.id)) == len(PATH[state]) + 1


# --- concurrency ----------------------------------------------------------------------------------------------

def race(n: int, fn: Callable[[], Any]) -> list[Any]:
    """Run fn in n threads released together; return every result (re-raise the first error)."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_twenty_threads_racing_one_step_apply_it_once(store: JobStore) -> None:
    job = make_job(store, S.PROCESSING)
    results = race(20, lambda: store.step(job.id, S.GENERATED, source="callback"))
    assert sum(r.applied for r in results) == 1
    assert [e.to_state for e in store.events(job.id)].count("generated") == 1
    assert all(r.job.state is S.GENERATED for r in results)


def test_racing_different_steps_leave_one_consistent_history(store: JobStore,
                                                               redis_client: redis.Redis) -> None:
    job = make_job(store, S.SUBMITTED)
    targets = [S.PROCESSING, S.GENERATED, S.FAILED, S.CANCELED] * 5
    lock = threading.Lock()
    order = iter(targets)

    def step() -> Any:
        with lock:
            to = next(order)
        return store.step(job.id, to, source="callback")

    results = race(len(targets), step)
    applied = [r for r in results if r.applied]
    events = store.events(job.id)[2:]
    assert len(events) == len(applied) >= 1
    for a, b in zip(events, events[1:], strict=False):
        assert a.to_state == b.from_state
    final = store.require(job.id).state
    assert events[-1].to_state == final.value
    assert [s for s in S if job.id in index_members(redis_client, s)] == [final]


# --- idempotency ----------------------------------------------------------------------------------------------

def test_same_key_and_body_returns_the_first_job(store: JobStore) -> None:
    first, created1 = store.create(dict(REQUEST), notify_url="https://app/hook", metadata={"u": 1},
                                   idempotency_key="k-1")
    again, created2 = store.create(dict(REQUEST), notify_url="https://app/hook", metadata={"u": 1},
                                   idempotency_key="k-1")
    assert created1 and not created2
    assert again == first
    assert len(store.events(first.id)) == 1
    assert store.counts()["queued"] == 1


@pytest.mark.parametrize("change", [
    {"request": {**REQUEST, "prompt": "a dog surfing"}},
    {"notify_url": "https://other/hook"},
    {"metadata": {"u": 2}},
])
def test_same_key_other_body_is_a_conflict(store: JobStore, change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"request": dict(REQUEST), "notify_url": "https://app/hook", "metadata": {"u": 1}}
    first, _ = store.create(base["request"], notify_url=base["notify_url"], metadata=base["metadata"],
                            idempotency_key="k-1")
    other = {**base, **change}
    with pytest.raises(IdempotencyConflict) as info:
        store.create(other["request"], notify_url=other["notify_url"], metadata=other["metadata"],
                     idempotency_key="k-1")
    assert info.value.job_id == first.id
    assert store.counts()["queued"] == 1


def test_without_a_key_every_create_is_a_new_job(store: JobStore) -> None:
    a, _ = store.create(dict(REQUEST))
    b, _ = store.create(dict(REQUEST))
    assert a.id != b.id and store.counts()["queued"] == 2


def test_ten_threads_racing_create_with_one_key_make_one_job(store: JobStore) -> None:
    results = race(10, lambda: store.create(dict(REQUEST), idempotency_key="same"))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.counts()["queued"] == 1
    assert len(store.list(limit=200)[0]) == 1


def test_the_idempotency_key_is_stored_hashed(store: JobStore, redis_client: redis.Redis) -> None:
    store.create(dict(REQUEST), idempotency_key="customer-secret-key")
    keys = redis_client.keys("kr:idem:*")
    assert len(keys) == 1 and "customer-secret-key" not in keys[0]
    assert re.fullmatch(r"kr:idem:[0-9a-f]{64}", keys[0])


# --- create, ids, attempts, notes -----------------------------------------------------------------------------

def test_create_stores_everything(store: JobStore, clock: FakeClock) -> None:
    job, _ = store.create(dict(REQUEST), notify_url="https://app/hook", metadata={"user": "u1"},
                          deadline_seconds=3600, due_in=120)
    assert job.state is S.QUEUED and store.request(job.id) == REQUEST
    assert job.notify_url == "https://app/hook" and job.metadata == {"user": "u1"}
    assert job.created_at == job.updated_at == clock.now
    assert job.deadline_at == clock.now + 3600
    assert job.kling_task_id is None and job.error is None and job.videos == [] and job.attempts == {}
    [event] = store.events(job.id)
    assert (event.from_state, event.to_state, event.source, event.at) == (None, "queued", "api", clock.now)
    assert store.due(now=clock.now + 119) == [] and store.due(now=clock.now + 120) == [job.id]


def test_job_ids_are_url_safe_bounded_and_time_sortable(store: JobStore, clock: FakeClock) -> None:
    ids = []
    for _ in range(20):
        ids.append(store.create(dict(REQUEST))[0].id)
        clock.advance(0.002)
    for job_id in ids:
        assert re.fullmatch(r"job_[0-9A-Z]{26}", job_id) and len(job_id) <= 64
    assert ids == sorted(ids) and len(set(ids)) == 20


@pytest.mark.parametrize("key", ["callback_url", "external_task_id"])
def test_create_refuses_per_job_kling_fields(store: JobStore, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        store.create({**REQUEST, key: "x"})
    assert store.counts()["queued"] == 0


def test_the_store_needs_a_decoding_client(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            JobStore(raw)
    finally:
        raw.close()


def test_set_kling_task_id_sets_only_an_empty_slot(store: JobStore) -> None:
    job = make_job(store)
    assert store.set_kling_task_id(job.id, "kt-1", source="worker") == (True, None)
    assert store.set_kling_task_id(job.id, "kt-1", source="callback") == (True, "kt-1")
    assert store.set_kling_task_id(job.id, "kt-2", source="callback") == (False, "kt-1")
    assert store.require(job.id).kling_task_id == "kt-1"
    recorded = [e for e in store.events(job.id) if e.detail.get("kling_task_id")]
    assert [(e.from_state, e.to_state, e.detail) for e in recorded] == [
        ("queued", "queued", {"kling_task_id": "kt-1"})]


def test_set_kling_task_id_race_keeps_one(store: JobStore) -> None:
    job = make_job(store)
    ids = iter(f"kt-{i}" for i in range(10))
    lock = threading.Lock()

    def claim() -> tuple[bool, str | None]:
        with lock:
            task_id = next(ids)
        return store.set_kling_task_id(job.id, task_id, source="worker")

    results = race(10, claim)
    winners = [r for r in results if r == (True, None)]
    assert len(winners) == 1
    kept = store.require(job.id).kling_task_id
    assert all(r == (False, kept) for r in results if r != (True, None))


def test_bump_attempt_counts_per_kind(store: JobStore) -> None:
    job = make_job(store)
    assert [store.bump_attempt(job.id, "submit") for _ in range(3)] == [1, 2, 3]
    assert store.bump_attempt(job.id, "copy") == 1
    assert store.require(job.id).attempts == {"submit": 3, "copy": 1}
    with pytest.raises(ValueError):
        store.bump_attempt(job.id, "Bad Kind")


def test_bump_attempt_is_atomic(store: JobStore) -> None:
    job = make_job(store)
    results = race(20, lambda: store.bump_attempt(job.id, "submit"))
    assert sorted(results) == list(range(1, 21))


def test_note_appends_an_event_without_a_state_change(store: JobStore, clock: FakeClock) -> None:
    job = make_job(store, S.SUBMITTED)
    clock.advance(3)
    store.note(job.id, source="callback", detail={"duplicate": "submitted"})
    after = store.require(job.id)
    assert after == job
    last = store.events(job.id)[-1]
    assert (last.from_state, last.to_state, last.source, last.detail, last.at) == (
        "submitted", "submitted", "callback", {"duplicate": "submitted"}, clock.now)


def test_events_limit_and_cap(redis_client: redis.Redis, clock: FakeClock) -> None:
    store = JobStore(redis_client, clock=clock, max_events=5)
    job = make_job(store)
    for i in range(10):
        clock.advance(1)
        store.note(job.id, source="worker", detail={"i": i})
    events = store.events(job.id)
    assert [e.detail["i"] for e in events] == [5, 6, 7, 8, 9]
    assert [e.detail["i"] for e in store.events(job.id, limit=2)] == [8, 9]


# --- listing --------------------------------------------------------------------------------------------------

def walk(store: JobStore, *, state: JobState | None = None, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        jobs, cursor = store.list(state=state, limit=limit, cursor=cursor)
        pages.append([j.id for j in jobs])
        if cursor is None:
            return pages


def test_list_pages_newest_first_without_duplicates(store: JobStore, clock: FakeClock) -> None:
    created = []
    for i in range(23):
        created.append(make_job(store, S.SUBMITTED if i % 3 == 0 else S.QUEUED).id)
        clock.advance(1)
    newest_first = list(reversed(created))

    pages = walk(store, limit=5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [i for p in pages for i in p] == newest_first

    submitted = [i for n, i in enumerate(created) if n % 3 == 0][::-1]
    by_state = walk(store, state=S.SUBMITTED, limit=4)
    assert [i for p in by_state for i in p] == submitted
    assert [len(p) for p in by_state] == [4, 4]
    assert walk(store, state=S.STORED, limit=10) == [[]]


def test_list_pages_through_jobs_created_in_the_same_instant(store: JobStore) -> None:
    ids = {make_job(store).id for _ in range(17)}  # the clock does not move
    pages = walk(store, limit=4)
    flat = [i for p in pages for i in p]
    assert len(flat) == 17 and set(flat) == ids
    assert flat == sorted(ids, reverse=True)


def test_list_limits_and_bad_cursors(store: JobStore) -> None:
    for _ in range(3):
        make_job(store)
    for bad in (0, 201, -1):
        with pytest.raises(ValueError):
            store.list(limit=bad)
    assert len(store.list(limit=200)[0]) == 3
    jobs, cursor = store.list(limit=3)
    assert len(jobs) == 3 and cursor is None
    for junk in ("not-a-cursor", "", "W10", "eyJ4IjoxfQ"):
        with pytest.raises(ValueError, match="cursor"):
            store.list(cursor=junk)


def test_list_skips_jobs_that_are_gone_and_drops_their_entries(store: JobStore, redis_client: redis.Redis,
                                                               clock: FakeClock) -> None:
    keep = make_job(store)
    clock.advance(1)
    gone = make_job(store)
    redis_client.delete(f"kr:job:{gone.id}", f"kr:job:{gone.id}:events")  # as if its TTL ran out
    jobs, _ = store.list()
    assert [j.id for j in jobs] == [keep.id]
    assert redis_client.zscore("kr:jobs:all", gone.id) is None


def test_bulk_copies_of_a_job_read_like_jobs_the_store_made(store: JobStore, redis_client: redis.Redis) -> None:
    """tests/support/bulk_jobs.py fills Redis for the tests that need thousands of jobs: its copies must be
    indistinguishable from the template, apart from the id."""
    template = make_job(store, S.STORED)
    ids = copy_job(redis_client, template.id, 5, batch=2)
    assert len(set(ids)) == 5 and template.id not in ids
    for job_id in ids:
        assert store.require(job_id) == dataclasses.replace(template, id=job_id)
        assert store.events(job_id) == store.events(template.id)
        assert redis_client.get(f"kr:job:{job_id}:request") == redis_client.get(f"kr:job:{template.id}:request")
    assert store.counts()["stored"] == 6
    announced = redis_client.zrange("kr:outbox", 0, -1)
    assert len(announced) == 6 and {m.split("|")[0] for m in announced} == {template.id, *ids}
    assert {j.id for j in store.list(state=S.STORED)[0]} == {template.id, *ids}


def test_counts(store: JobStore) -> None:
    for state, n in {S.QUEUED: 2, S.PROCESSING: 1, S.FAILED: 3}.items():
        for _ in range(n):
            make_job(store, state)
    assert store.counts() == {"queued": 2, "submitted": 0, "processing": 1, "generated": 0, "stored": 0,
                              "failed": 3, "canceled": 0}


# --- due index ------------------------------------------------------------------------------------------------

def test_due_returns_only_jobs_that_are_due(store: JobStore, clock: FakeClock) -> None:
    soon = make_job(store, due_in=10)
    later = make_job(store, due_in=100)
    never = make_job(store)
    assert store.due() == []
    clock.advance(10)
    assert store.due() == [soon.id]
    assert store.due(now=clock.now + 90) == [soon.id, later.id]
    assert never.id not in store.due(now=clock.now + 10**9)
    assert store.due(now=clock.now + 90, limit=1) == [soon.id]


def test_steps_move_keep_and_drop_the_due_time(store: JobStore, redis_client: redis.Redis,
                                               clock: FakeClock) -> None:
    job = make_job(store, due_in=10)
    store.step(job.id, S.SUBMITTED, source="worker", due_in=300)
    assert redis_client.zscore("kr:jobs:due", job.id) == clock.now + 300
    store.step(job.id, S.PROCESSING, source="callback")  # "keep"
    assert redis_client.zscore("kr:jobs:due", job.id) == clock.now + 300
    store.step(job.id, S.GENERATED, source="callback", due_in=None)
    assert redis_client.zscore("kr:jobs:due", job.id) is None
    store.set_due(job.id, 50)
    assert store.due(now=clock.now + 50) == [job.id]
    store.step(job.id, S.STORED, source="worker", due_in=30)  # terminal wins over due_in
    assert store.due(now=clock.now + 10**9) == []
    store.set_due(job.id, 5)  # a terminal job is never due again
    assert store.due(now=clock.now + 10**9) == []


def test_a_no_op_step_leaves_the_due_time_alone(store: JobStore, redis_client: redis.Redis,
                                                clock: FakeClock) -> None:
    job = make_job(store, S.GENERATED, due_in=10)
    store.step(job.id, S.PROCESSING, source="callback", due_in=None)
    assert redis_client.zscore("kr:jobs:due", job.id) == clock.now + 10


def command_stats(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_due_reads_only_the_due_index_among_ten_thousand_jobs(store: JobStore, redis_client: redis.Redis,
                                                              clock: FakeClock) -> None:
    small = {"prompt": "p", "image_list": [{"image": "https://img.example/a.png"}]}
    pipe = redis_client.pipeline(transaction=False)
    for i in range(10_000):  # plain creates, pipelined to keep the test fast; the due ones go through create()
        job_id = f"job_bulk{i:05d}"
        pipe.hset(f"kr:job:{job_id}", mapping={"id": job_id, "state": "queued", "request": json.dumps(small),
                                               "created_at": repr(clock.now), "updated_at": repr(clock.now)})
        pipe.zadd("kr:jobs:all", {job_id: clock.now})
        pipe.zadd("kr:jobs:state:queued", {job_id: clock.now})
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()
    for i in range(10_000):
        if i % 100 == 0:
            pipe.zadd("kr:jobs:due", {f"job_bulk{i:05d}": clock.now + 3600})  # due later, not now
    pipe.execute()
    due_now = {make_job(store, due_in=i).id for i in range(10)}
    assert redis_client.dbsize() > 10_000
    clock.advance(60)

    redis_client.config_resetstat()
    found = store.due(limit=100)
    stats = command_stats(redis_client)

    assert set(found) == due_now and len(found) == 10
    data_commands = {k: v for k, v in stats.items() if not k.startswith(("config", "info", "client"))}
    assert data_commands == {"zrangebyscore": 1}


# --- public shape, reprs, TTL ---------------------------------------------------------------------------------

def test_public_dict_shape_and_no_images(store: JobStore) -> None:
    job, _ = store.create(dict(REQUEST), notify_url="https://app/hook", metadata={"user": "u1"})
    store.step(job.id, S.FAILED, source="worker",
               set_fields={"error": {"reason": "kling_rejected:1301", "code": 1301, "message": "no"}})
    job = store.require(job.id)
    public = job.public_dict(store.events(job.id))

    assert set(public) == {"id", "state", "kling_task_id", "created_at", "updated_at", "error", "videos",
                           "events", "metadata", "notify_url", "notify_events", "units", "balance_deduction", "app"}
    assert public["units"] is None and public["balance_deduction"] is None  # Kling has not billed anything
    assert public["state"] == "failed" and public["error"]["code"] == 1301
    for stamp in (public["created_at"], public["updated_at"], public["events"][0]["at"]):
        assert stamp.endswith("Z") and datetime.fromisoformat(stamp).timestamp() > 0
    assert [set(e) for e in public["events"]] == [{"at", "from", "to", "source", "detail"}] * 2
    assert [(e["from"], e["to"]) for e in public["events"]] == [(None, "queued"), ("queued", "failed")]
    text = json.dumps(public)
    assert IMAGE_B64 not in text and "img.example" not in text and "image_list" not in text
    assert "events" not in job.public_dict()
    shown = repr(job)
    assert IMAGE_B64 not in shown and "app/hook" not in shown and job.id in shown


def test_ttl_applies_once_a_job_is_finished_and_retry_lifts_it(redis_client: redis.Redis,
                                                               clock: FakeClock) -> None:
    store = JobStore(redis_client, clock=clock, job_ttl_seconds=3600)
    job = make_job(store, S.PROCESSING, idempotency_key="k")
    assert redis_client.ttl(f"kr:job:{job.id}") == -1
    assert 0 < redis_client.ttl(next(iter(redis_client.keys("kr:idem:*")))) <= 3600
    store.step(job.id, S.FAILED, source="worker")
    assert 0 < redis_client.ttl(f"kr:job:{job.id}") <= 3600
    assert redis_client.ttl(f"kr:job:{job.id}:events") == -2  # the timeline is in the job hash (test_jobs_memory)
    assert 0 < redis_client.ttl(f"kr:job:{job.id}:request") <= 3600
    store.retry(job.id, source="api")
    assert redis_client.ttl(f"kr:job:{job.id}") == -1
    assert redis_client.ttl(f"kr:job:{job.id}:request") == -1


def test_request_is_kept_out_of_the_job_hash(store: JobStore, redis_client: redis.Redis) -> None:
    job, _ = store.create(dict(REQUEST))
    assert "request" not in redis_client.hgetall(f"kr:job:{job.id}")
    assert store.request(job.id) == REQUEST
    with pytest.raises(JobNotFound):
        store.request("job_missing")


def test_a_key_whose_job_is_gone_makes_a_new_job(store: JobStore, redis_client: redis.Redis) -> None:
    first, _ = store.create(dict(REQUEST), idempotency_key="k")
    redis_client.delete(f"kr:job:{first.id}")  # expired
    second, created = store.create(dict(REQUEST), idempotency_key="k")
    assert created and second.id != first.id


def test_the_step_into_stored_drops_the_request_and_other_ends_keep_it(redis_client: redis.Redis,
                                                                       clock: FakeClock) -> None:
    """Nothing reads a stored job's request from Redis (its manifest records it; only a failed job is retried),
    so the step into `stored` deletes it; a failed or canceled job keeps it until it expires with the job."""
    store = JobStore(redis_client, clock=clock, job_ttl_seconds=3600)
    stored = make_job(store, S.GENERATED)
    store.step(stored.id, S.STORED, source="worker")
    assert not redis_client.exists(f"kr:job:{stored.id}:request")
    with pytest.raises(JobNotFound):
        store.request(stored.id)
    for end in (S.FAILED, S.CANCELED):
        job = make_job(store, S.GENERATED)
        store.step(job.id, end, source="worker")
        assert store.request(job.id) == REQUEST
        assert 0 < redis_client.ttl(f"kr:job:{job.id}:request") <= 3600


def test_due_times_never_pass_the_deadline(store: JobStore, redis_client: redis.Redis, clock: FakeClock) -> None:
    job, _ = store.create(dict(REQUEST), deadline_seconds=100, due_in=10)
    deadline = clock.now + 100
    store.set_due(job.id, 3600)
    assert redis_client.zscore("kr:jobs:due", job.id) == deadline
    store.step(job.id, S.SUBMITTED, source="worker", due_in=5000)
    assert redis_client.zscore("kr:jobs:due", job.id) == deadline
    store.step(job.id, S.PROCESSING, source="callback", due_in=30)
    assert redis_client.zscore("kr:jobs:due", job.id) == clock.now + 30
    free, _ = store.create(dict(REQUEST), due_in=10)  # no deadline: as asked
    store.set_due(free.id, 3600)
    assert redis_client.zscore("kr:jobs:due", free.id) == clock.now + 3600


def test_writes_gathered_are_made_together_and_only_at_execute(store: JobStore, redis_client: redis.Redis,
                                                               clock: FakeClock) -> None:
    """`JobStore.writes()`: the due pushes and notes of many jobs in one round trip (the reconciler's, issue 11),
    each as `set_due` / `note` would make it; nothing before `execute`; a job found gone is named, not raised."""
    queued = make_job(store, due_in=0, deadline_seconds=100)
    stored = make_job(store, S.STORED)
    gone = make_job(store)
    redis_client.delete(f"kr:job:{gone.id}")
    before = store.events(queued.id)
    writes = store.writes()
    writes.set_due(queued.id, 30)
    writes.note(queued.id, source="reconciler", detail={"requeued": "submit"})
    writes.set_due(stored.id, 30)
    writes.set_due(gone.id, 30)
    writes.note(gone.id, source="reconciler", detail={"requeued": "submit"})
    later = store.writes()
    later.set_due(queued.id, 3600)
    assert len(writes) == 5 and len(later) == 1
    asked = clock.now
    assert redis_client.zscore("kr:jobs:due", queued.id) == asked and store.events(queued.id) == before

    clock.advance(2)
    assert writes.execute() == [gone.id]

    assert redis_client.zscore("kr:jobs:due", queued.id) == asked + 30, "times are those of the calls"
    last = store.events(queued.id)[-1]
    assert (last.from_state, last.to_state, last.source, last.detail, last.at) == (
        "queued", "queued", "reconciler", {"requeued": "submit"}, asked)
    assert store.due(now=clock.now + 10**9) == [queued.id], "a terminal job is never due again"
    assert redis_client.zscore("kr:jobs:due", gone.id) is None
    assert writes.execute() == [], "written once"
    later.execute()
    assert redis_client.zscore("kr:jobs:due", queued.id) == asked + 100, "never past the deadline"
    with pytest.raises(JobNotFound):
        store.writes().set_due("kr:jobs:due", 1)  # not a job id: refused at once, as by set_due


def _cursor(score: object, job_id: object) -> str:
    raw = score if isinstance(score, str) else json.dumps([score, job_id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _cursor("[" + "9" * 400 + ', "job_x"]', None), _cursor(10**400, "job_x"), _cursor(float("nan"), "job_x"),
    _cursor(float("inf"), "job_x"), _cursor(float("-inf"), "job_x"), _cursor("[1e400, \"job_x\"]", None),
    _cursor(2.0**60, "job_x"), _cursor(1.0, "job_x:events"), _cursor(1.0, ""), _cursor(1.0, 5),
    _cursor(True, "job_x"), _cursor("[1.0]", None), _cursor("[1.0, \"job_x\", 3]", None),
    _cursor('{"a": 1, "b": 2}', None), _cursor("[" * 3000 + "]" * 3000, None), "!!not base64!!", "job_\udcff",
    "A" * 300,
], ids=["huge-int-text", "huge-int", "nan", "infinity", "minus-infinity", "overflowing-float", "out-of-range",
        "id-not-a-job-id", "empty-id", "int-id", "bool-score", "one-item", "three-items", "object", "deep",
        "not-base64", "surrogate", "too-long"])
def test_a_malformed_cursor_is_invalid_cursor_never_another_error(store: JobStore, cursor: str) -> None:
    """Issue: a forged cursor with a huge integer was an OverflowError (a 500); a NaN one a Redis error; an
    infinite one was accepted. Every malformed cursor is one exception type, a ValueError, raised by the store."""
    make_job(store)
    with pytest.raises(InvalidCursor, match="cursor"):
        store.list(cursor=cursor)
    assert issubclass(InvalidCursor, ValueError)


def test_a_cursor_the_store_made_still_works(store: JobStore, clock: FakeClock) -> None:
    for _ in range(3):
        make_job(store)
        clock.advance(1)
    first, cursor = store.list(limit=2)
    assert cursor is not None
    rest, end = store.list(limit=2, cursor=cursor)
    assert len(first) == 2 and len(rest) == 1 and end is None


@pytest.mark.parametrize("suffix", [":events", ":request"])
def test_an_id_that_is_not_a_job_id_is_no_job_and_reads_no_other_key(store: JobStore, suffix: str) -> None:
    """Issue: `job_…:events` named the job's events list and the read failed with Redis' WRONGTYPE error."""
    job = make_job(store)
    other = job.id + suffix
    assert store.get(other) is None
    assert store.events(other) == []
    store.forget_attempt(other, "submit")
    with pytest.raises(JobNotFound):
        store.require(other)
    with pytest.raises(JobNotFound):
        store.request(other)
    with pytest.raises(JobNotFound):
        store.step(other, S.CANCELED, source="api")
    with pytest.raises(JobNotFound):
        store.retry(other, source="api")
    with pytest.raises(JobNotFound):
        store.note(other, source="api", detail={})
    with pytest.raises(JobNotFound):
        store.bump_attempt(other, "submit")
    with pytest.raises(JobNotFound):
        store.set_due(other, 5)
    with pytest.raises(JobNotFound):
        store.set_kling_task_id(other, "task", source="worker")
    assert store.require(job.id).state is S.QUEUED and len(store.events(job.id)) == 1


def test_a_new_job_still_names_itself_for_the_previous_releases_scripts(store: JobStore,
                                                                          redis_client: redis.Redis) -> None:
    """Rolling upgrade: the step scripts of the release before 2026-12-08 take a job's id from its hash's `id` field;
    without it an old web pod's step on a new job changed the state but moved no index, queued no announcement and
    set no expiry (Redis keeps a script's writes made before its error). New jobs keep writing it."""
    job, _ = store.create({"model_name": "kling-v1-6", "prompt": "p"}, source="api")
    assert redis_client.hget(f"kr:job:{job.id}", "id") == job.id
