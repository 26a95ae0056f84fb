"""Flow control on a real redis-server: the shared rate limit, the in-flight cap and the pause."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from kling_relay.shared import flow, kling_codes
from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.kling import KlingRetryLater
from kling_relay.shared.runtime import limited_kling_client
from tests.support.clock import FakeClock
from tests.support.relay_runtime import REQUEST, relay_settings
from tests.support.sim import SimHandle, sim_fixture

# --- rate limit ---------------------------------------------------------------------------------------------------

def test_limiter_lets_a_burst_through_then_spaces_requests(redis_client: redis.Redis) -> None:
    clock = FakeClock(1_000.0)
    limiter = flow.RateLimiter(redis_client, 5, clock=clock)
    assert [limiter.try_acquire() for _ in range(5)] == [0.0] * 5
    wait = limiter.try_acquire()
    assert wait == pytest.approx(0.2)
    clock.now += 0.1
    assert limiter.try_acquire() == pytest.approx(0.1)
    clock.now += 0.1
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() == pytest.approx(0.2)


def test_limiter_is_shared_by_every_instance(redis_client: redis.Redis, redis_url: str) -> None:
    clock = FakeClock(1_000.0)
    other_client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        a = flow.RateLimiter(redis_client, 2, clock=clock)
        b = flow.RateLimiter(other_client, 2, clock=clock)
        assert a.try_acquire() == 0.0 and b.try_acquire() == 0.0
        assert a.try_acquire() > 0 and b.try_acquire() > 0
    finally:
        other_client.close()


def test_limiter_grants_exactly_the_rate_over_time(redis_client: redis.Redis) -> None:
    clock = FakeClock(1_000.0)
    limiter = flow.RateLimiter(redis_client, 4, burst=1, clock=clock)
    granted = 0
    for step in range(640):  # 10 simulated seconds in exact steps of 1/64 s
        clock.now = 1000 + step / 64
        if limiter.try_acquire() == 0.0:
            granted += 1
    assert granted == 40


def test_limiter_on_redis_clock_refuses_the_request_over_the_burst(redis_client: redis.Redis) -> None:
    limiter = flow.RateLimiter(redis_client, 2)
    assert limiter.try_acquire() == 0.0 and limiter.try_acquire() == 0.0
    wait = limiter.try_acquire()
    assert 0 < wait <= 0.5


def test_acquire_waits_briefly_then_raises_rate_limited(redis_client: redis.Redis) -> None:
    clock = FakeClock(1_000.0)
    limiter = flow.RateLimiter(redis_client, 1, clock=clock)
    limiter.acquire(max_wait=0, sleep=clock.sleep)
    start = clock.now
    limiter.acquire(max_wait=1.5, sleep=clock.sleep)  # waits one second, within max_wait
    assert clock.now - start == pytest.approx(1.0)
    with pytest.raises(flow.RateLimited) as info:
        limiter.acquire(max_wait=0.5, sleep=clock.sleep)
    assert info.value.retry_after == pytest.approx(1.0)
    assert isinstance(info.value, KlingRetryLater) and info.value.retryable


sim = sim_fixture()


def test_limited_client_sends_nothing_over_the_limit(redis_url: str, redis_client: redis.Redis,
                                                     sim: SimHandle) -> None:
    sim.reset()
    settings = relay_settings(redis_url, sim, KLING_RATE_LIMIT_PER_SECOND="0.01")
    client = limited_kling_client(settings, redis_client, max_wait=0)
    try:
        assert client.list_tasks(page_size=1) == []
        with pytest.raises(flow.RateLimited) as info:
            client.list_tasks(page_size=1)
        with pytest.raises(flow.RateLimited):
            client.create_multi_image2video({**REQUEST, "external_task_id": "job_x"})
    finally:
        client.close()
    assert 90 < info.value.retry_after <= 100
    stats = sim.stats()
    assert stats["requests"] == {"GET /v1/videos/multi-image2video": 1}
    assert stats["tasks_created"] == 0


# --- in-flight cap ------------------------------------------------------------------------------------------------

def test_cap_admits_exactly_cap_reservations_under_a_race(redis_url: str) -> None:
    results: dict[str, bool] = {}
    barrier = threading.Barrier(30)

    def reserve(n: int) -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            barrier.wait()
            results[f"job{n}"] = flow.reserve_in_flight(client, f"job{n}", 5, 60)
        finally:
            client.close()

    threads = [threading.Thread(target=reserve, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results.values()) == 5


def test_cap_counts_submitted_and_processing_jobs(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    for to in (JobState.SUBMITTED, JobState.PROCESSING, JobState.GENERATED):
        job, _ = store.create(dict(REQUEST))
        store.step(job.id, to, source="worker")
    assert flow.in_flight(redis_client) == {"submitted": 1, "processing": 1, "reserved": 0}
    assert flow.reserve_in_flight(redis_client, "a", 3, 60)
    assert not flow.reserve_in_flight(redis_client, "b", 3, 60)
    assert flow.reserve_in_flight(redis_client, "a", 3, 60), "a job renews its own reservation"
    assert flow.in_flight(redis_client)["reserved"] == 1
    flow.release_in_flight(redis_client, "a")
    assert flow.reserve_in_flight(redis_client, "b", 3, 60)


def test_a_reservation_left_behind_lapses(redis_client: redis.Redis) -> None:
    assert flow.reserve_in_flight(redis_client, "dead-worker-job", 1, 0.05)
    # the score is the expiry on Redis' clock: move it into the past instead of sleeping
    redis_client.zadd("kr:flow:in_flight", {"dead-worker-job": 1})
    assert flow.reserve_in_flight(redis_client, "next", 1, 60)
    assert redis_client.zrange("kr:flow:in_flight", 0, -1) == ["next"]


# --- pause --------------------------------------------------------------------------------------------------------

def test_pause_reasons() -> None:
    assert [kling_codes.pause_reason(c) for c in (1000, 1004, 1304)] == ["auth"] * 3
    assert [kling_codes.pause_reason(c) for c in (1100, 1101, 1102, 1103)] == ["account"] * 4
    assert kling_codes.PAUSE_CODES == frozenset([*range(1000, 1005), *range(1100, 1104), 1304])


def test_pause_gates_every_submit_until_resumed(redis_client: redis.Redis) -> None:
    assert flow.status(redis_client)["submission"] == "open"
    assert flow.gate(redis_client, "job1") == "open"
    assert flow.pause(redis_client, code=1101, message="account in arrears", job_id="job1")
    assert not flow.pause(redis_client, code=1102, message="resource pack used up", job_id="job2")
    assert flow.gate(redis_client, "job1") == "paused" and flow.gate(redis_client, "job3") == "paused"
    status = flow.status(redis_client)
    assert status["submission"] == "paused"
    pause = status["pause"]
    assert pause["reason"] == "account" and pause["code"] == 1102 and pause["message"] == "resource pack used up"
    assert pause["hits"] == 2 and pause["job_id"] == "job2"
    assert pause["since"] is not None and pause["since"] <= pause["updated_at"]
    cleared = flow.resume(redis_client, by="ops")
    assert cleared is not None and cleared["code"] == 1102
    assert flow.gate(redis_client, "job3") == "open"
    assert flow.resume(redis_client) is None
    assert flow.status(redis_client) == {"submission": "open", "pause": None,
                                         "in_flight": {"submitted": 0, "processing": 0, "reserved": 0}}


def test_trial_lets_one_job_through_and_a_new_pause_closes_it(redis_client: redis.Redis) -> None:
    assert not flow.open_trial(redis_client, 30), "no trial without a pause"
    flow.pause(redis_client, code=1101, message="arrears")
    assert flow.open_trial(redis_client, 30)
    assert flow.gate(redis_client, "job1") == "trial"
    assert flow.gate(redis_client, "job2") == "paused"
    assert flow.gate(redis_client, "job1") == "trial", "the trial job's retry may go again"
    assert flow.current_pause(redis_client)["trial_job"] == "job1"  # type: ignore[index]
    flow.pause(redis_client, code=1101, message="still in arrears", job_id="job1")
    assert flow.gate(redis_client, "job1") == "paused"
    assert flow.current_pause(redis_client)["trial_until"] is None  # type: ignore[index]


def test_probe_is_claimed_once_per_interval(redis_client: redis.Redis) -> None:
    assert flow.claim_probe(redis_client, 30)
    assert not flow.claim_probe(redis_client, 30)
    assert 0 < redis_client.pttl("kr:flow:probe") <= 30_000


def test_status_never_shows_a_secret(redis_client: redis.Redis, tmp_path: Path) -> None:
    flow.pause(redis_client, code=1002, message="token invalid")
    text = repr(flow.status(redis_client))
    assert "token invalid" in text and "Bearer" not in text
