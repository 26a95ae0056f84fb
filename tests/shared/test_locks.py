"""Redis locks on a real redis-server: one holder, token-checked release and refresh, expiry, heartbeat."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from kling_relay.shared.locks import RedisLock, job_lock
from tests.support.waiting import wait_until


def test_only_one_holder_and_release_frees_it(redis_client: redis.Redis) -> None:
    a = RedisLock(redis_client, "kr:lock:x", 10)
    b = RedisLock(redis_client, "kr:lock:x", 10)
    assert a.acquire()
    assert not b.acquire()
    assert b.held_by_anyone()
    assert not b.release(), "a non-holder cannot release"
    assert redis_client.exists("kr:lock:x")
    assert a.release()
    assert not a.held_by_anyone()
    assert b.acquire()


def test_lock_expires_with_its_ttl(redis_client: redis.Redis) -> None:
    lock = RedisLock(redis_client, "kr:lock:x", 20)
    assert lock.acquire()
    assert 0 < redis_client.pttl("kr:lock:x") <= 20_000


def test_an_expired_holder_cannot_touch_the_new_holders_lock(redis_client: redis.Redis) -> None:
    old = RedisLock(redis_client, "kr:lock:x", 10)
    assert old.acquire()
    redis_client.delete("kr:lock:x")  # what the expiry does
    new = RedisLock(redis_client, "kr:lock:x", 10)
    assert new.acquire()
    assert not old.refresh()
    assert not old.release()
    assert new.held_by_anyone() and new.refresh()


def test_a_race_has_exactly_one_winner(redis_url: str) -> None:
    wins: list[bool] = []
    barrier = threading.Barrier(20)

    def grab() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            barrier.wait()
            wins.append(RedisLock(client, "kr:lock:race", 10).acquire())
        finally:
            client.close()

    threads = [threading.Thread(target=grab) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_heartbeat_keeps_a_short_lock_alive_and_stops_with_the_block(redis_client: redis.Redis) -> None:
    lock = RedisLock(redis_client, "kr:lock:hb", 0.4)
    assert lock.acquire()
    with lock.heartbeat(every=0.05):
        time.sleep(1.2)  # deliberate: three times the ttl, without the heartbeat the key would be gone
        assert redis_client.get("kr:lock:hb") is not None
    lock.release()
    assert not redis_client.exists("kr:lock:hb")


def test_without_heartbeat_the_lock_lapses(redis_client: redis.Redis) -> None:
    lock = RedisLock(redis_client, "kr:lock:nohb", 0.1)
    assert lock.acquire()
    wait_until(lambda: not lock.held_by_anyone(), timeout=10, what="the 0.1 s lock to lapse")


def test_context_manager_needs_acquire_and_releases(redis_client: redis.Redis) -> None:
    lock = RedisLock(redis_client, "kr:lock:cm", 10)
    with pytest.raises(RuntimeError):
        with lock:
            pass
    assert lock.acquire()
    with lock:
        assert redis_client.exists("kr:lock:cm")
    assert not redis_client.exists("kr:lock:cm")


def test_job_lock_keys_and_no_token_in_repr(redis_client: redis.Redis) -> None:
    lock = job_lock(redis_client, "copy", "job_1", 20)
    assert lock.key == "kr:lock:copy:job_1"
    assert lock.acquire()
    token = redis_client.get("kr:lock:copy:job_1")
    assert token and token not in repr(lock)
    with pytest.raises(ValueError):
        RedisLock(redis_client, "k", 0)
