"""Callback delivery: POST the task object to callback_url on every status change.

Each task has a lane: its callbacks go out one at a time, in order, so without fault knobs a listener
sees submitted, processing, then the final status. A delivery that fails (non-2xx, redirect, timeout,
connection error) is retried `callback_retries` times with a doubling back-off, holding the lane.
Fault knobs act per status change: drop (never sent), duplicate (queued N times), delay (queued after
N seconds). Reordering is decided by the engine, which holds back the 'processing' callback.
Environment proxies are ignored: the simulator talks to the callback host directly.

With a webhook secret (`--webhook-secret`, what Kling's console issues as `whsec_<base64>`; any other string is
used as its UTF-8 bytes) every attempt is signed per Standard Webhooks, as Kling's newer docs describe: headers
`webhook-id` (one per delivery, the same on its retries), `webhook-timestamp` (unix seconds of the attempt) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`. Without one, callbacks are unsigned
(Kling's default).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kling_relay.simulator.faults import Faults
from kling_relay.simulator.stats import Stats
from kling_relay.simulator.tasks import now_ms
from kling_relay.simulator.timers import Scheduler

log = logging.getLogger("simulator")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def signing_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: `whsec_<base64>` decoded, any other string as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ webhook secret must be base64 after the prefix") from None
    return secret.encode()


def signature_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one signed message."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


@dataclass
class _Delivery:
    url: str
    body: bytes
    status: str
    attempt: int = 1
    msg_id: str = ""


class CallbackDispatcher:
    def __init__(self, scheduler: Scheduler, faults: Faults, stats: Stats, *, workers: int = 8,
                 webhook_secret: str | None = None) -> None:
        self._signing_key = signing_key(webhook_secret) if webhook_secret else None
        self._scheduler = scheduler
        self._faults = faults
        self._stats = stats
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sim-callback")
        self._lock = threading.Lock()
        self._lanes: dict[str, deque[_Delivery]] = {}
        self._active: set[str] = set()
        self._epoch = 0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def send(self, task_id: str, url: str, payload: dict[str, Any]) -> None:
        """Queue the callbacks for one status change, applying the drop/duplicate/delay knobs."""
        knobs = self._faults.knobs
        status = str(payload["task_status"])
        if self._faults.hit("callback_drop"):
            self._stats.callback(task_id, {"status": status, "dropped": True, "at": now_ms()})
            return
        body = json.dumps(payload).encode()
        deliveries = [_Delivery(url, body, status, msg_id=f"msg_{uuid.uuid4().hex}")
                      for _ in range(knobs.callback_duplicate)]
        epoch = self._epoch
        if knobs.callback_delay > 0:
            self._scheduler.call_later(knobs.callback_delay,
                                       lambda: self._enqueue(task_id, deliveries, epoch))
        else:
            self._enqueue(task_id, deliveries, epoch)

    def reset(self) -> None:
        """Forget every queued callback; deliveries in progress finish but are not recorded."""
        with self._lock:
            self._epoch += 1
            self._lanes.clear()
            self._active.clear()

    def shutdown(self) -> None:
        self.reset()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _enqueue(self, task_id: str, deliveries: list[_Delivery], epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return
            self._lanes.setdefault(task_id, deque()).extend(deliveries)
            if task_id in self._active:
                return
            self._active.add(task_id)
        self._submit(task_id, epoch)

    def _submit(self, task_id: str, epoch: int) -> None:
        try:
            self._pool.submit(self._drain, task_id, epoch)
        except RuntimeError:  # pool shut down: the simulator is stopping
            pass

    def _drain(self, task_id: str, epoch: int) -> None:
        while True:
            with self._lock:
                lane = self._lanes.get(task_id)
                if epoch != self._epoch or lane is None:
                    return
                if not lane:
                    del self._lanes[task_id]
                    self._active.discard(task_id)
                    return
                delivery = lane[0]
            ok = self._attempt(task_id, delivery, epoch)
            knobs = self._faults.knobs
            with self._lock:
                if epoch != self._epoch:
                    return
                if ok or delivery.attempt > knobs.callback_retries:
                    lane.popleft()
                    continue
                delay = knobs.callback_retry_backoff * 2 ** (delivery.attempt - 1)
                delivery.attempt += 1
            self._scheduler.call_later(delay, lambda: self._submit(task_id, epoch))
            return

    def _attempt(self, task_id: str, delivery: _Delivery, epoch: int) -> bool:
        entry: dict[str, Any] = {"status": delivery.status, "attempt": delivery.attempt, "at": now_ms()}
        headers = {"Content-Type": "application/json", "User-Agent": "kling-callback/1.0"}
        if self._signing_key is not None:
            headers.update(signature_headers(self._signing_key, delivery.msg_id, int(time.time()), delivery.body))
        request = urllib.request.Request(  # noqa: S310 - callback_url validated as http(s) at create
            delivery.url, data=delivery.body, method="POST", headers=headers)
        try:
            with self._opener.open(request, timeout=self._faults.knobs.callback_timeout) as response:
                response.read(65536)
                entry["http_status"] = response.status
        except urllib.error.HTTPError as exc:
            entry["http_status"] = exc.code
            exc.close()
        except (OSError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        ok = 200 <= int(entry.get("http_status", 0)) < 300
        if epoch == self._epoch:
            self._stats.callback(task_id, entry)
        if not ok:
            log.info("callback for task %s (%s) failed: %s", task_id, delivery.status,
                     entry.get("http_status") or entry.get("error"))
        return ok
