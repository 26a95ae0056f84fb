"""kombu's Redis and Sentinel transports with acknowledgements that survive a failover or a restart.

With late acks, each task's message stays in the broker's unacked index until its task ends, and the worker counts
it against its prefetch limit until the ack is done. kombu's Redis QoS removes the message from the index first
and frees the slot only if that worked: an ack that meets a dead primary (a failover's few seconds) raises, Celery
logs "Couldn't ack" and goes on, and the slot is never freed. Once every slot is gone the worker asks the broker
for nothing more and never notices the connection is lost: it sits idle for good (seen with the primary killed in
the middle of 50 jobs, tests/e2e/test_faults_sentinel.py).

Here an ack or a reject that fails on a connection error is tried again, on a fresh connection to whatever primary
the sentinels name, for up to ACK_RETRY_SECONDS; the slot is freed whatever the outcome. A message whose ack was
given up on stays in the unacked index and comes back after the visibility timeout: a second delivery of a task is
harmless (each step checks the job's state under its lock).

Publishing reuses one Redis client per connection pool. kombu's `Channel.conn_or_acquire` builds a new `redis.Redis`
for every publish that is not handed a client (every task sent, every task event), and each construction copies
redis-py's table of some 300 response callbacks: in the pipeline bench that was about 7% of the worker's CPU (seven
events and one or two tasks per job). A `redis.Redis` over a pool is safe to share between threads (each command
takes a connection from the pool); the client is made again whenever kombu replaces the pool (after a disconnect).
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger(__name__)

ACK_RETRY_SECONDS = 30.0
ACK_RETRY_PAUSE = 0.5


class FailoverQoS(kombu_redis.QoS):
    def ack(self, delivery_tag: Any) -> None:
        self._retrying("ack", lambda: self._remove_from_indices(delivery_tag).execute())
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self._retrying("requeue", lambda: self.restore_by_tag(delivery_tag, leftmost=True))
        else:
            self._retrying("reject", lambda: self._remove_from_indices(delivery_tag).execute())
        virtual.QoS.ack(self, delivery_tag)

    def _retrying(self, what: str, call: Callable[[], Any]) -> None:
        deadline = time.monotonic() + ACK_RETRY_SECONDS
        while True:
            try:
                call()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
                if time.monotonic() >= deadline:
                    log.warning("broker ack given up; the message comes back after the visibility timeout",
                                extra={"op": what, "error": type(exc).__name__})
                    return
                time.sleep(ACK_RETRY_PAUSE)


class ReusedClient:
    """`conn_or_acquire` with one client per connection pool instead of one per call (see the module docstring)."""

    _reused: tuple[Any, Any] | None = None
    pool: Any

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        reused = self._reused
        if reused is None or reused[0] is not pool:
            reused = self._reused = (pool, self._create_client())  # type: ignore[attr-defined]
        yield reused[1]


class FailoverSentinelChannel(ReusedClient, kombu_redis.SentinelChannel):
    QoS = FailoverQoS


class FailoverSentinelTransport(kombu_redis.SentinelTransport):
    Channel = FailoverSentinelChannel


class FailoverChannel(ReusedClient, kombu_redis.Channel):
    QoS = FailoverQoS


class FailoverTransport(kombu_redis.Transport):
    """The same for one Redis (`redis://`): an ack while it restarts is retried until it is back."""

    Channel = FailoverChannel
