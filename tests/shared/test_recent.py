"""shared/recent.py: what a web process may answer from memory, for how long, and how much it keeps."""

from __future__ import annotations

import pytest

from kling_relay.shared.jobs_model import JobState
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.pipeline import KLING_STATUS_TO_STATE
from kling_relay.shared.recent import RecentStates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settled(recent: RecentStates, job_id: str, task: KlingTask) -> bool:
    return recent.settled(job_id, task, KLING_STATUS_TO_STATE[task.status]) is not None


@pytest.mark.parametrize(("state", "task", "settled"), [
    (JobState.PROCESSING, KlingTask("t", "processing"), True),       # a repeat
    (JobState.PROCESSING, KlingTask("t", "submitted"), True),        # stale
    (JobState.SUBMITTED, KlingTask("t", "processing"), False),       # forward: the step applies
    (JobState.PROCESSING, KlingTask("other", "processing"), False),  # not the bound task
    (JobState.GENERATED, KlingTask("t", "succeed"), False),          # its URLs may be fresher (callbacks-only)
    (JobState.STORED, KlingTask("t", "succeed"), True),              # nothing left to use them for
    (JobState.PROCESSING, KlingTask("t", "failed"), False),          # a failure applies to any unfinished job
    (JobState.CANCELED, KlingTask("t", "failed"), True),
    (JobState.STORED, KlingTask("t", "succeed", final_unit_deduction="2"), False),  # the bill is recorded
])
def test_what_memory_alone_may_answer(state: JobState, task: KlingTask, settled: bool) -> None:
    recent = RecentStates()
    recent.note("job", "t", state)
    assert _settled(recent, "job", task) is settled


def test_a_failed_job_or_an_unbound_one_is_forgotten() -> None:
    """The operators' retry moves a failed job back to queued: a remembered `failed` could be stale."""
    recent = RecentStates()
    recent.note("job", "t", JobState.PROCESSING)
    recent.note("job", "t", JobState.FAILED)
    assert recent.get("job") is None
    recent.note("job", "t", JobState.PROCESSING)
    recent.note("job", None, JobState.QUEUED)
    assert recent.get("job") is None and len(recent) == 0


def test_entries_expire_and_the_oldest_go_first() -> None:
    clock = Clock()
    recent = RecentStates(max_entries=2, ttl_seconds=5, clock=clock)
    recent.note("a", "t", JobState.PROCESSING)
    clock.now += 1
    recent.note("b", "t", JobState.PROCESSING)
    recent.note("a", "t", JobState.PROCESSING)  # seen again: now the newest
    recent.note("c", "t", JobState.PROCESSING)
    assert len(recent) == 2 and recent.get("b") is None and recent.get("a") is not None
    clock.now += 4.9
    assert recent.get("c") is not None  # noted 4.9 s ago
    clock.now += 0.2
    assert recent.get("c") is None and not _settled(recent, "c", KlingTask("t", "processing"))


def test_bounds_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        RecentStates(max_entries=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        RecentStates(ttl_seconds=0)
