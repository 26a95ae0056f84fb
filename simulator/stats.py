"""Counters the tests read through `GET /_sim/stats`.

Requests are counted per method and route template (prefix left out, e.g.
`POST /v1/videos/multi-image2video`), and per Kling error code answered. Callbacks keep one entry per
attempt, in order: `{"status", "attempt", "at", "http_status"}` or `{..., "error"}`, or
`{"status", "dropped": true}` for a callback the drop knob swallowed.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._tasks_created = 0
            self._by_external: dict[str, list[str]] = defaultdict(list)
            self._duplicates: Counter[str] = Counter()
            self._callbacks: dict[str, list[dict[str, Any]]] = defaultdict(list)
            self._requests: Counter[str] = Counter()
            self._error_codes: Counter[str] = Counter()
            self._downloads: dict[str, dict[str, int]] = {}

    def request(self, route: str) -> None:
        with self._lock:
            self._requests[route] += 1

    def error_code(self, code: int) -> None:
        with self._lock:
            self._error_codes[str(code)] += 1

    def task_created(self, task_id: str, external_id: str | None) -> None:
        with self._lock:
            self._tasks_created += 1
            if external_id is not None:
                self._by_external[external_id].append(task_id)

    def duplicate_create(self, external_id: str) -> None:
        with self._lock:
            self._duplicates[external_id] += 1

    def callback(self, task_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._callbacks[task_id].append(entry)

    def download(self, task_id: str, *, started: int = 0, completed: int = 0, bytes_sent: int = 0) -> None:
        with self._lock:
            d = self._downloads.setdefault(task_id, {"started": 0, "completed": 0, "bytes_sent": 0})
            d["started"] += started
            d["completed"] += completed
            d["bytes_sent"] += bytes_sent

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tasks_created": self._tasks_created,
                "tasks_by_external_id": {k: list(v) for k, v in self._by_external.items()},
                "duplicate_creates": dict(self._duplicates),
                "callbacks": {k: [dict(e) for e in v] for k, v in self._callbacks.items()},
                "requests": dict(self._requests),
                "error_codes": dict(self._error_codes),
                "downloads": {k: dict(v) for k, v in self._downloads.items()},
            }
