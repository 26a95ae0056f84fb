"""An ack across a Sentinel failover (issue 12 item 5), or a restart of one Redis, on real redis-server processes.

kombu's stock Redis QoS frees a late-acked message's prefetch slot only if removing it from the unacked index
worked: an ack that meets the dead primary raises and the slot is lost. A worker whose slots are all lost this
way (concurrency 4, four acks in the failover's few seconds: seen in tests/e2e/test_faults_sentinel.py) asks the
broker for nothing more and sits idle for good. FailoverQoS retries the ack on the new primary and frees the slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis

from deploy.procs import RedisServer, SentinelCluster
from kling_relay.shared.broker_transport import FailoverSentinelTransport, FailoverTransport
from kling_relay.shared.redis_conn import celery_broker


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def delivered_then_failover(cluster: SentinelCluster, transport: type) -> tuple[object, object]:
    """A message taken (not acked) from a queue, then the primary SIGKILLed; returns (message, channel.qos)."""
    url, options = celery_broker(cluster.url)
    options.pop("broker_transport")
    conn = Connection(url, transport=transport, transport_options=options)
    channel = conn.channel()
    queue = Queue("q", channel=channel)
    queue.declare()
    conn.Producer(channel).publish({"n": 1}, routing_key="q")
    channel.basic_qos(prefetch_size=0, prefetch_count=1, apply_global=False)  # a worker's slot: prefetch 1
    message = queue.get(no_ack=False)
    assert message is not None and not channel.qos.can_consume()
    primary = cluster.server_on(cluster.primary_port())
    assert primary.process is not None
    primary.process.kill()
    primary.process.proc.wait(30)
    primary.stop()
    return message, channel.qos


def test_stock_qos_loses_the_slot_when_the_ack_meets_the_failover(cluster: SentinelCluster) -> None:
    message, qos = delivered_then_failover(cluster, kombu_redis.SentinelTransport)
    with pytest.raises(redis.ConnectionError):
        message.ack()  # type: ignore[attr-defined]
    assert not qos.can_consume()  # type: ignore[attr-defined]  # the prefetch slot is gone for good


def test_failover_qos_acks_on_the_new_primary(cluster: SentinelCluster) -> None:
    message, qos = delivered_then_failover(cluster, FailoverSentinelTransport)
    message.ack()  # type: ignore[attr-defined]
    assert qos.can_consume()  # type: ignore[attr-defined]
    new_primary = redis.Redis(port=cluster.primary_port(), decode_responses=True)
    assert new_primary.zcard("unacked_index") == 0  # removed from the index on the promoted replica


def _queue_q(server: RedisServer) -> tuple[Connection, Any, Queue]:
    """A connection to `server` over the relay's transport, its channel, and the queue `q` declared on it."""
    conn = Connection(celery_broker(server.url)[0], transport=FailoverTransport)
    channel = conn.channel()
    queue = Queue("q", channel=channel)
    queue.declare()
    return conn, channel, queue


def test_failover_qos_acks_after_a_single_redis_restarts(tmp_path: Path) -> None:
    """One Redis (redis://), stopped while a message is taken: the ack waits for it to come back (same port)."""
    server = RedisServer(tmp_path / "one", appendonly=True).start()
    try:
        conn, channel, queue = _queue_q(server)
        conn.Producer(channel).publish({"n": 1}, routing_key="q")
        channel.basic_qos(prefetch_size=0, prefetch_count=1, apply_global=False)
        message = queue.get(no_ack=False)
        assert message is not None and not channel.qos.can_consume()
        server.stop()
        threading.Timer(1.0, server.start).start()  # back on the same port a second later
        message.ack()
        assert channel.qos.can_consume()
        assert redis.Redis.from_url(server.url).zcard("unacked_index") == 0
    finally:
        server.stop()


def test_publishing_reuses_one_client_per_pool(tmp_path: Path) -> None:
    """kombu builds a redis.Redis per publish (every task sent, every task event); the relay's channel reuses one
    per connection pool, and a new one once kombu replaced the pool (after a disconnect). Publishes still land."""
    server = RedisServer(tmp_path / "one").start()
    try:
        conn, channel, queue = _queue_q(server)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        producer = conn.Producer(channel)
        for n in range(3):
            producer.publish({"n": n}, routing_key="q")
        channel._disconnect_pools()  # what kombu does when the connection is lost
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.connection_pool is channel.pool
        producer.publish({"n": 3}, routing_key="q")
        assert [queue.get(no_ack=True).payload["n"] for _ in range(4)] == [0, 1, 2, 3]
        # the stock channel: a new client each time (why the override exists)
        stock = Connection(celery_broker(server.url)[0], transport=kombu_redis.Transport).channel()
        with stock.conn_or_acquire() as a, stock.conn_or_acquire() as b:
            assert a is not b
    finally:
        server.stop()
