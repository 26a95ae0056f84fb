"""What this web process last read of a job's state, so that a repeated callback is answered without Redis.

Kling repeats itself: a callback is retried until it gets a 2xx, and `submitted`/`processing` are often told more
than once. Such a callback changes nothing, yet costs the one Redis round trip that reads the job (most of a
callback's CPU under gevent: issue 11, bench/callbacks.py). `RecentStates` keeps, per job, the task id and the
state this process last read or wrote, for a few seconds, and `settled` says when that memory alone proves the
callback changes nothing:

- the callback's task is the job's bound task (a task id Kling itself answered, never one a callback named);
- the step it asks for would not apply to the remembered state (`step_applies`); states only move forward, so it
  applies to no later state either. The one way back, the operators' retry of a `failed` job, is why a remembered
  `failed` is never used. (A job another process failed and an operator retried within `ttl_seconds` may still be
  remembered here in its state before the failure: a repeat of that older status is then answered "no change",
  where the full path would apply it to the retried job, whose submit looks its task up with Kling anyway);
- nothing else in it needs keeping: it reports `submitted` or `processing` (no video URLs, which callbacks-only
  mode keeps from `succeed`; those two were kept when first heard), or the job is already `stored`/`canceled`;
  and it carries no billing figures (`usage.record_deduction` runs on the full path).

Anything else (a miss, another task, an applicable step, a `succeed`/`failed` for a job not yet finished) takes
the full path, which reads Redis and refreshes the memory. The memory is per process, bounded (`max_entries`,
oldest first out) and short-lived (`ttl_seconds`), so a job deleted meanwhile is answered 2xx by the fast path
where the full path would say 404: either way nothing changes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kling_relay.shared.jobs_model import JobState, step_applies
from kling_relay.shared.kling import KlingTask

#: Kling statuses whose repeat carries nothing the relay keeps (see the module docstring).
_PLAIN_STATUSES = frozenset({"submitted", "processing"})
#: Remembered states that a repeated callback of any status can no longer change.
_FINISHED = frozenset({JobState.STORED, JobState.CANCELED})


@dataclass(frozen=True)
class Seen:
    task_id: str
    state: JobState
    at: float


class RecentStates:
    """job id → (bound task id, state) as this process last saw them; bounded, entries expire."""

    def __init__(self, max_entries: int = 10_000, ttl_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError("max_entries must be ≥ 1 and ttl_seconds > 0")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._seen: OrderedDict[str, Seen] = OrderedDict()
        self._lock = threading.Lock()  # a threaded server's requests share it (gevent's workers: a greenlet lock)

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, job_id: str, task_id: str | None, state: JobState | None) -> None:
        """Remember what was just read or written (a job without a bound task, or gone, is forgotten)."""
        with self._lock:
            if task_id is None or state is None or state is JobState.FAILED:
                self._seen.pop(job_id, None)
                return
            self._seen[job_id] = Seen(task_id, state, self._clock())
            self._seen.move_to_end(job_id)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)

    def get(self, job_id: str) -> Seen | None:
        with self._lock:
            seen = self._seen.get(job_id)
            if seen is not None and self._clock() - seen.at > self.ttl_seconds:
                del self._seen[job_id]
                return None
            return seen

    def settled(self, job_id: str, task: KlingTask, to: JobState) -> Seen | None:
        """What was seen of the job when it proves this callback (asking for the step to `to`) changes nothing."""
        seen = self.get(job_id)
        if seen is None or seen.task_id != task.task_id or step_applies(seen.state, to):
            return None
        if task.final_unit_deduction is not None or task.final_balance_deduction is not None:
            return None
        if task.status in _PLAIN_STATUSES or seen.state in _FINISHED:
            return seen
        return None
