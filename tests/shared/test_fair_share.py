"""Issue 13.4: the in-flight cap is shared fairly between apps with queued work (real Redis, the simulator, the
plain submit function).

The submit queue is modelled as Celery runs it: FIFO, and a throttled submit (RetryIn) goes back to the end of the
queue. Kling "finishes" the oldest in-flight job once a whole pass through the queue has been handled since the
last one (a task takes minutes, a throttled message milliseconds): it is stepped to `generated`, leaving the
in-flight count, so places free up one at a time while app A's backlog rotates through the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pytest

from kling_relay.shared import flow, keys
from kling_relay.shared.jobs import JobState
from kling_relay.shared.pipeline import RetryIn, submit_job
from kling_relay.shared.runtime import Runtime
from tests.support.relay_runtime import REQUEST, close_runtime, make_runtime, relay_settings
from tests.support.sim import SimHandle, sim_fixture

CAP = 2


sim = sim_fixture("--callback-retries", "0")


@pytest.fixture()
def runtime(redis_url: str, sim: SimHandle) -> Iterator[Runtime]:
    sim.reset()
    rt = make_runtime(relay_settings(redis_url, sim, KLING_MAX_IN_FLIGHT=str(CAP),
                                     KLING_RATE_LIMIT_PER_SECOND="1000"), limited=False)
    yield rt
    close_runtime(rt)


def _run_queue(rt: Runtime, queue: deque[str], until: set[str]) -> list[str]:
    """Handle submit messages until the jobs `until` are submitted (or the queue is empty); returns the job ids in
    the order they were submitted."""
    order: list[str] = []
    in_flight: deque[str] = deque()
    handled = since_finish = 0
    while queue and not until <= set(order):
        job_id = queue.popleft()
        try:
            outcome = submit_job(rt, job_id)
        except RetryIn:
            queue.append(job_id)  # a countdown retry: back of the queue
        else:
            assert outcome == "submitted", outcome
            order.append(job_id)
            in_flight.append(job_id)
        handled += 1
        since_finish += 1
        if since_finish > len(queue) and in_flight:  # a task takes longer than a pass through the queue
            rt.store.step(in_flight.popleft(), JobState.GENERATED, source="callback")
            since_finish = 0
        assert handled < 100_000, "no progress"
    return order


def test_a_small_app_is_not_stuck_behind_a_big_apps_backlog(runtime: Runtime) -> None:
    """Acceptance: app A enqueues 200 jobs, then app B 5, with KLING_MAX_IN_FLIGHT=2: B's jobs are all submitted
    before A's backlog is through (measured by the order of their submits), and in fact within the first few,
    since each app holds at most half of the cap while both have queued work."""
    a = [runtime.store.create(dict(REQUEST), app="a", due_in=600)[0].id for _ in range(200)]
    b = [runtime.store.create(dict(REQUEST), app="b", due_in=600)[0].id for _ in range(5)]
    order = _run_queue(runtime, deque(a + b), until=set(b))
    a_done = [j for j in order if j in a]
    assert set(b) <= set(order) and len(a_done) < len(a), "A's backlog went through first"
    assert len(order) <= 2 * len(b) + CAP, order  # each app held half the cap while both had queued work
    # the submitted events' times give the same order; A's backlog is still queued after B's last submit
    assert sorted(order, key=lambda j: _submitted_at(runtime, j)) == order
    assert runtime.store.counts()["queued"] == len(a) - len(a_done) > 150


def _submitted_at(rt: Runtime, job_id: str) -> float:
    return next(e.at for e in rt.store.events(job_id) if e.from_state == "queued" and e.to_state == "submitted")


def test_an_app_alone_gets_the_whole_cap(runtime: Runtime) -> None:
    jobs = [runtime.store.create(dict(REQUEST), app="a", due_in=600)[0].id for _ in range(3)]
    assert submit_job(runtime, jobs[0]) == "submitted"
    assert submit_job(runtime, jobs[1]) == "submitted"
    with pytest.raises(RetryIn):
        submit_job(runtime, jobs[2])  # the cap, not a share
    assert flow.in_flight(runtime.redis)["submitted"] == CAP


def test_apps_without_active_jobs_are_pruned_from_the_apps_set(runtime: Runtime) -> None:
    gone = runtime.store.create(dict(REQUEST), app="gone", due_in=600)[0].id
    runtime.store.step(gone, JobState.CANCELED, source="api")
    job = runtime.store.create(dict(REQUEST), app="a", due_in=600)[0].id
    assert runtime.redis.sismember(keys.APPS, "gone")
    assert submit_job(runtime, job) == "submitted"
    assert not runtime.redis.sismember(keys.APPS, "gone") and runtime.redis.sismember(keys.APPS, "a")
