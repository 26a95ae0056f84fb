"""Kling misbehaves, for real (simulator fault knobs): callbacks lost, duplicated and reordered; creates
rate-limited, failing with 5xx, or ambiguous (the task is made, the answer lost). Every job still ends stored,
with exactly one Kling task, one video and one manifest.

The module runs its own stack with a 3 s Kling read timeout, so a create whose answer the simulator delays
for 8 s ends ambiguous on the relay's side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import (
    assert_callbacks_tripled_and_reordered,
    assert_stored_once,
    fault_stack,
    get_jobs,
    needs_reconciler,
    retry_notes,
    wait_until,
)

pytestmark = pytest.mark.e2e

CREATE = "POST /v1/videos/multi-image2video"


@pytest.fixture(scope="module")
def kling_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with fault_stack(tmp_path_factory.mktemp("faults-kling"), env={"KLING_TIMEOUT_SECONDS": "3"}) as stack:
        yield stack


@pytest.fixture()
def stack(kling_stack: LocalStack) -> LocalStack:
    """The module's stack with the simulator's tasks, counters and knobs back to their start values."""
    kling_stack.sim_reset()
    return kling_stack


def submit_jobs(stack: LocalStack, count: int, first: int) -> list[str]:
    return [submit(stack, job_body(first + n)) for n in range(count)]


@needs_reconciler
def test_all_callbacks_dropped_jobs_are_stored_through_the_reconciler(stack: LocalStack) -> None:
    stack.sim_control(callback_drop_every_n=1)
    ids = submit_jobs(stack, 5, 1000)
    jobs = wait_jobs(stack, ids, timeout=90)
    stats = stack.sim_stats()
    for job in jobs.values():
        callbacks = stats["callbacks"][job["kling_task_id"]]
        assert callbacks and all(c.get("dropped") for c in callbacks), callbacks  # not one was delivered
        assert not [e for e in job["events"] if e["source"] == "callback"]
        generated = [e for e in job["events"] if e["to"] == "generated" and e["from"] != "generated"]
        assert [e["source"] for e in generated] == ["reconciler"], job["events"]
    assert_stored_once(stack, jobs)


def test_callbacks_duplicated_three_times_and_reordered(stack: LocalStack) -> None:
    stack.sim_control(callback_duplicate=3, callback_reorder=True)
    ids = submit_jobs(stack, 5, 1100)
    jobs = wait_jobs(stack, ids, timeout=90)
    stats = stack.sim_stats()
    for job in jobs.values():
        assert_callbacks_tripled_and_reordered(stats, job)
    assert_stored_once(stack, jobs)


@pytest.mark.parametrize("server_error_creates_task", [False, True], ids=["5000-no-task", "5000-after-task"])
def test_rate_limited_and_failing_creates(stack: LocalStack, server_error_creates_task: bool) -> None:
    stack.sim_control(rate_limit_every_n=3, server_error_every_n=5, server_error_on="create",
                      server_error_code=5000, server_error_creates_task=server_error_creates_task)
    ids = submit_jobs(stack, 6, 1200 + 10 * server_error_creates_task)
    jobs = wait_jobs(stack, ids, timeout=120)
    stats = stack.sim_stats()
    rate_limited, server_errors = stats["error_codes"].get("1302", 0), stats["error_codes"].get("5000", 0)
    assert rate_limited >= 1 and server_errors >= 1, stats["error_codes"]  # the faults really happened
    assert [j["id"] for j in jobs.values() if j["state"] != "stored"] == []
    assert_stored_once(stack, jobs)
    # A refused create (1302) is simply sent again. A 5000 is ambiguous for the relay: it looks the task up
    # before creating again, and creates only if Kling has none, so a 5000 that made the task costs no create.
    creates = stats["requests"].get(CREATE)
    assert creates == len(ids) + rate_limited + (0 if server_error_creates_task else server_errors), stats["requests"]


@pytest.mark.parametrize("mode", ["drop", "delay"])
def test_ambiguous_creates_make_one_task_per_job(stack: LocalStack, mode: str) -> None:
    stack.sim_control(ambiguous_create_every_n=2, ambiguous_create_mode=mode, ambiguous_create_delay=8)
    ids = submit_jobs(stack, 6, 1300 + 10 * (mode == "delay"))
    wait_jobs(stack, ids, timeout=120)
    # Callbacks may bring a job to stored before its worker gives up on the lost answer: wait until the
    # worker has seen all three ambiguous creates (and so made its decision about creating again).
    def all_three_noted() -> dict[str, dict[str, Any]] | None:
        jobs = get_jobs(stack, ids)
        return jobs if sum(bool(retry_notes(j, "ambiguous create")) for j in jobs.values()) >= 3 else None

    jobs = wait_until(all_three_noted, timeout=60, what="three ambiguous creates noted", stack=stack, interval=0.5)
    # each create made a task (every 2nd lost its answer): six creates for six jobs, never one again
    assert stack.sim_stats()["requests"].get(CREATE) == 6
    assert_stored_once(stack, jobs)
