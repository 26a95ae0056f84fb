"""Short Redis locks with an owner token, an expiry and an optional heartbeat.

A lock is one key set with `SET key token NX PX ttl`: whoever set it holds it until it releases it or the
expiry passes. Release and refresh are compare-and-act Lua scripts, so a process whose lock already expired
(and was taken by another) can neither delete nor extend the new holder's lock.

The expiry is short on purpose: a SIGKILLed worker cannot release its lock, and the job it held must become
free again quickly for the reconciler to rescue it. Long work (a copy of a big video) keeps its lock with
`heartbeat()`, a thread that extends it every `ttl/4` while the work runs; a dead process stops extending it.

Keys (`keys`): `kr:lock:submit:<job_id>`, `kr:lock:copy:<job_id>`, `kr:lock:reconcile`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import redis

from kling_relay.shared import keys

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisLock:
    """One named lock; `acquire()` never blocks. Usable as a context manager only after a successful acquire.

    `ttl` is in seconds (fractions allowed, at least 10 ms). The token is random per instance and never logged.
    """

    def __init__(self, client: redis.Redis, key: str, ttl: float) -> None:
        if ttl < 0.01:
            raise ValueError("ttl must be at least 0.01 seconds")
        self._r = client
        self.key = key
        self.ttl = ttl
        self._token = secrets.token_hex(16)
        self._held = False
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)

    def __repr__(self) -> str:
        return f"RedisLock(key={self.key!r}, ttl={self.ttl}, held={self._held})"

    @property
    def _ttl_ms(self) -> int:
        return max(10, int(self.ttl * 1000))

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True on success."""
        self._held = bool(self._r.set(self.key, self._token, nx=True, px=self._ttl_ms))
        return self._held

    def refresh(self) -> bool:
        """Extend the expiry to `ttl` from now if this instance still holds the lock; False if it was lost."""
        ok = bool(self._refresh(keys=[self.key], args=[self._token, self._ttl_ms]))
        if not ok:
            self._held = False
        return ok

    def release(self) -> bool:
        """Delete the lock if this instance still holds it; False if it had expired (or was never taken)."""
        released = bool(self._release(keys=[self.key], args=[self._token]))
        self._held = False
        return released

    def held_by_anyone(self) -> bool:
        """Whether any process holds this lock now."""
        return bool(self._r.exists(self.key))

    @contextmanager
    def heartbeat(self, every: float | None = None) -> Iterator[None]:
        """Keep extending the lock (every `ttl/4` by default) until the block ends.

        A refresh that finds the lock lost (expired and possibly taken by another process) is logged once and
        stops the heartbeat; the work inside carries on, as the steps it takes are idempotent anyway. A Redis
        error in a refresh is logged and retried at the next beat.
        """
        interval = every if every is not None else self.ttl / 4
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    if not self.refresh():
                        log.warning("lock lost while working", extra={"lock": self.key})
                        return
                except redis.RedisError as exc:
                    log.warning("lock refresh failed", extra={"lock": self.key, "error": str(exc)})

        thread = threading.Thread(target=beat, name=f"heartbeat {self.key}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def __enter__(self) -> RedisLock:
        if not self._held:
            raise RuntimeError("acquire() the lock before entering it")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def job_lock(client: redis.Redis, step: str, job_id: str, ttl: float) -> RedisLock:
    """The lock that keeps two workers from running the same step (`submit`, `copy`) of one job at once."""
    return RedisLock(client, keys.job_lock(step, job_id), ttl)
