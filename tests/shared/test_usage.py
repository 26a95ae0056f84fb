"""What each video cost (issue 9 item 6): deductions recorded once, units per UTC day and month, the daily budget
guard (pause with reason `budget`, lifted on a new UTC day, by an operator's resume, or when the budget allows).

Plain functions against the simulator and a real Redis; the day is moved with the runtime's clock (`rt.clock`)
and the reconciler's `now`, never by waiting. The simulator does not report `final_unit_deduction`, so the
finished tasks are fed in as Kling would post them (`apply_task_status`, the webhook's and the poll's step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from kling_relay.shared import flow, usage
from kling_relay.shared.jobs import JobState
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.pipeline import apply_task_status, copy_job, submit_job
from kling_relay.shared.reconcile import reconcile
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.storage import Storage
from tests.support.clock import FakeClock
from tests.support.relay_runtime import REQUEST, close_runtime, make_runtime, new_job, relay_settings
from tests.support.s3 import MotoS3, moto_fixture
from tests.support.sim import UNIT_SIM_ARGS, SimHandle, sim_fixture
from tests.support.waiting import wait_until

CREATE = "POST /v1/videos/multi-image2video"
LIST = "GET /v1/videos/multi-image2video"
DAY_1 = datetime(2030, 3, 31, 12, 0, tzinfo=UTC).timestamp()  # the last day of a month
DAY_2 = datetime(2030, 4, 1, 0, 0, 1, tzinfo=UTC).timestamp()  # one second into the next UTC day (and month)


sim = sim_fixture(*UNIT_SIM_ARGS, "--video-bytes", "2000")


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock(DAY_1)


@pytest.fixture()
def runtime(redis_url: str, sim: SimHandle, clock: FakeClock, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """A Runtime on the test clock; `@pytest.mark.parametrize("runtime", [{...}], indirect=True)` sets env."""
    sim.reset()
    env: dict[str, Any] = {"KLING_RATE_LIMIT_PER_SECOND": "1000", **getattr(request, "param", {})}
    rt = make_runtime(relay_settings(redis_url, sim, **env))
    rt.clock = clock
    yield rt
    close_runtime(rt)


def creates(sim: SimHandle) -> int:
    return int(sim.stats()["requests"].get(CREATE, 0))


def submitted(rt: Runtime) -> str:
    job = new_job(rt)
    assert submit_job(rt, job.id) == "submitted"
    return job.id


def finish(rt: Runtime, job_id: str, units: float | None, *, balance: float | None = None,
           status: str = "succeed") -> None:
    """Kling reports the job's task finished, billing `units` (as a callback or a poll would)."""
    task_id = rt.store.require(job_id).kling_task_id
    assert task_id is not None
    task = KlingTask(task_id, status, external_task_id=job_id, final_unit_deduction=units,  # type: ignore[arg-type]
                     final_balance_deduction=balance)
    apply_task_status(rt, job_id, task, source="callback")


def pause_reason(rt: Runtime) -> str | None:
    pause = flow.current_pause(rt.redis)
    return None if pause is None else str(pause["reason"])


# --- recording ------------------------------------------------------------------------------------------------

def test_a_deduction_counts_once_however_often_it_is_reported(runtime: Runtime, clock: FakeClock) -> None:
    """A duplicated callback, a poll and a later callback with the balance: the units count once, in the UTC day
    and month they were learned on."""
    job_id = submitted(runtime)
    for _ in range(3):
        finish(runtime, job_id, 2.0)
    finish(runtime, job_id, 2.0, balance=0.28)  # a later report adds the balance, not the units again
    finish(runtime, job_id, 5.0, balance=9.0)  # and nothing overwrites what was recorded
    job = runtime.store.require(job_id)
    assert (job.units, job.balance_deduction) == (2.0, 0.28)
    assert job.public_dict()["units"] == 2 and job.public_dict()["balance_deduction"] == 0.28
    assert usage.spent(runtime.redis, now=DAY_1) == {"day": "2030-03-31", "today": 2, "month": 2,
                                                    "budget_override": False}

    clock.now = DAY_2  # a new UTC day and month
    other = submitted(runtime)
    finish(runtime, other, 1.5)
    assert usage.spent(runtime.redis, now=DAY_2) == {"day": "2030-04-01", "today": 1.5, "month": 1.5,
                                                    "budget_override": False}
    assert usage.spent(runtime.redis, now=DAY_1)["today"] == 2


def test_a_task_without_a_readable_deduction_records_nothing(runtime: Runtime) -> None:
    job_id = submitted(runtime)
    finish(runtime, job_id, None)
    assert runtime.store.require(job_id).units is None
    assert runtime.store.require(job_id).public_dict()["units"] is None
    assert usage.spent(runtime.redis, now=DAY_1)["today"] == 0


def test_a_canceled_jobs_task_is_still_billed(runtime: Runtime) -> None:
    """Kling has no cancel API: the task of a canceled job still finishes and is billed, so it counts."""
    job_id = submitted(runtime)
    runtime.store.step(job_id, JobState.CANCELED, source="api")
    finish(runtime, job_id, 1.0)
    assert runtime.store.require(job_id).state is JobState.CANCELED
    assert runtime.store.require(job_id).units == 1.0
    assert usage.spent(runtime.redis, now=DAY_1)["today"] == 1


# --- the budget guard -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", [{"KLING_DAILY_UNIT_BUDGET": "3"}], indirect=True)
def test_the_budget_pauses_submission_and_a_new_utc_day_resumes_it(runtime: Runtime, sim: SimHandle,
                                                                   clock: FakeClock) -> None:
    first, second, third = submitted(runtime), submitted(runtime), submitted(runtime)  # 0 + 2 in flight + 1 <= 3
    held, behind = new_job(runtime), new_job(runtime)
    assert submit_job(runtime, held.id) == "paused"  # 0 spent + 3 in flight + 1 > 3
    pause = flow.current_pause(runtime.redis)
    assert pause is not None and pause["reason"] == "budget" and pause["job_id"] == held.id
    assert pause["budget"] == 3 and pause["resume_at"] == "2030-04-01T00:00:00.000Z"
    assert "budget 3 reached" in pause["message"]
    assert submit_job(runtime, behind.id) == "paused"
    assert creates(sim) == 3, "no Kling create once over the budget"
    for job_id in (held.id, behind.id):
        job = runtime.store.require(job_id)
        assert job.state is JobState.QUEUED and job.error is None
        assert job.attempts.get("submit", 0) == job.attempts.get("submit_throttled", 0), "no attempt used"
    note = runtime.store.events(held.id)[-1].detail
    assert note == {"paused": "budget", "budget": 3.0, "spent_today": 0.0, "in_flight_estimate": 3.0,
                    "estimate": 1.0}

    for job_id in (first, second, third):
        finish(runtime, job_id, 1.0)  # the estimate was right: 3 spent, still no room today
    report = reconcile(runtime, now=DAY_1 + 60)
    assert report.probe == "budget_holds" and pause_reason(runtime) == "budget"
    assert held.id in report.waiting and LIST not in sim.stats()["requests"], "a budget pause is never probed"

    clock.now = DAY_2
    report = reconcile(runtime, now=DAY_2)
    assert report.probe == "budget_lifted" and flow.current_pause(runtime.redis) is None
    assert held.id in report.resubmitted and behind.id in report.resubmitted
    assert submit_job(runtime, held.id) == "submitted"
    assert creates(sim) == 4


@pytest.mark.parametrize("runtime", [{"KLING_DAILY_UNIT_BUDGET": "2"}], indirect=True)
def test_an_operator_resume_lifts_the_budget_until_midnight_utc(runtime: Runtime, sim: SimHandle,
                                                               clock: FakeClock) -> None:
    for job_id in (submitted(runtime), submitted(runtime)):
        finish(runtime, job_id, 1.0)
    held, more = new_job(runtime), new_job(runtime)
    assert submit_job(runtime, held.id) == "paused"
    cleared = usage.operator_resume(runtime.redis, by="test", now=clock())
    assert cleared is not None and cleared["reason"] == "budget"
    assert usage.spent(runtime.redis, now=clock())["budget_override"] is True
    assert submit_job(runtime, held.id) == "submitted"
    assert submit_job(runtime, more.id) == "submitted", "the override holds for the rest of the day"
    assert flow.current_pause(runtime.redis) is None and creates(sim) == 4

    clock.now = DAY_2  # the override ended with the day: the guard is back
    assert usage.spent(runtime.redis, now=clock())["budget_override"] is False
    finish(runtime, held.id, 1.0)
    finish(runtime, more.id, 1.0)  # learned on day 2: 2 units spent today
    next_one = new_job(runtime)
    assert submit_job(runtime, next_one.id) == "paused"  # 2 + 0 + 1 > 2
    assert pause_reason(runtime) == "budget"


@pytest.mark.parametrize("runtime", [{"KLING_DAILY_UNIT_BUDGET": "5"}], indirect=True)
def test_the_estimate_is_the_last_deduction_seen_for_the_model_mode_and_duration(runtime: Runtime) -> None:
    first = submitted(runtime)
    finish(runtime, first, 2.0)  # kling-v1-6|std|5 now costs 2 (the default estimate is 1)
    assert runtime.redis.hgetall("kr:usage:estimates") == {"kling-v1-6|std|5": "2.0"}
    assert submitted(runtime)  # 2 spent + 0 in flight + 2 <= 5
    pricier = new_job(runtime)
    assert submit_job(runtime, pricier.id) == "paused"  # 2 + 2 + 2 > 5 (with the default: 2 + 1 + 1 <= 5)
    pause = flow.current_pause(runtime.redis)
    assert pause is not None and "spent today 2 + in flight (estimated) 2 + next job 2" in pause["message"]

    other_combo, _ = runtime.store.create({**REQUEST, "mode": "pro"})
    verdict = usage.admit(runtime.redis, other_combo.id, usage.combination(runtime.store.request(other_combo.id)),
                          budget=5, default_estimate=1, now=DAY_1, register=False)
    assert verdict.estimate == 1 and verdict.admitted, "an unseen combination takes the default estimate"


@pytest.mark.parametrize("runtime", [{"KLING_DAILY_UNIT_BUDGET": "1"}], indirect=True)
def test_a_raised_budget_or_none_lifts_the_pause_the_same_day(runtime: Runtime) -> None:
    finish(runtime, submitted(runtime), 1.0)
    held = new_job(runtime)
    assert submit_job(runtime, held.id) == "paused"
    assert reconcile(runtime, now=DAY_1).probe == "budget_holds"
    runtime.settings = dataclasses.replace(runtime.settings, kling_daily_unit_budget=2.0)
    assert reconcile(runtime, now=DAY_1).probe == "budget_lifted"
    assert submit_job(runtime, held.id) == "submitted"

    again = new_job(runtime)
    assert submit_job(runtime, again.id) == "paused"  # 1 + 1 in flight + 1 > 2
    runtime.settings = dataclasses.replace(runtime.settings, kling_daily_unit_budget=None)
    assert reconcile(runtime, now=DAY_1).probe == "budget_lifted"
    assert submit_job(runtime, again.id) == "submitted"


def test_without_a_budget_nothing_is_held_back(runtime: Runtime, sim: SimHandle) -> None:
    assert runtime.settings.kling_daily_unit_budget is None
    for _ in range(3):
        finish(runtime, submitted(runtime), 100.0)
    assert submitted(runtime) and flow.current_pause(runtime.redis) is None
    assert usage.spent(runtime.redis, now=DAY_1)["today"] == 300


@pytest.mark.parametrize("runtime", [{"KLING_DAILY_UNIT_BUDGET": "1"}], indirect=True)
def test_an_account_pause_is_never_replaced_by_a_budget_pause(runtime: Runtime, sim: SimHandle) -> None:
    """The trial submit of an account pause that finds the budget spent leaves the account pause in force."""
    finish(runtime, submitted(runtime), 1.0)
    flow.pause(runtime.redis, code=1101, message="arrears")
    flow.open_trial(runtime.redis, 30)
    trial = new_job(runtime)
    assert submit_job(runtime, trial.id) == "paused"
    assert pause_reason(runtime) == "account" and creates(sim) == 1
    assert runtime.store.require(trial.id).state is JobState.QUEUED


# --- the manifest ---------------------------------------------------------------------------------------------

moto = moto_fixture()


def test_the_units_are_in_the_manifest_and_the_job(runtime: Runtime, moto: MotoS3) -> None:
    s3 = moto.client()
    s3.create_bucket(Bucket="units")
    runtime.storage = Storage(s3, "units")
    rt = runtime
    try:
        job_id = submitted(rt)
        task_id = rt.store.require(job_id).kling_task_id
        assert task_id is not None
        task = _wait_succeeded(rt, task_id)
        apply_task_status(rt, job_id, dataclasses.replace(task, final_unit_deduction=3.5), source="callback")
        assert copy_job(rt, job_id) == "stored"
        job = rt.store.require(job_id)
        manifest = rt.storage.read_manifest(job_id, job.created_at)
        assert manifest is not None
        assert manifest["units"] == 3.5 and manifest["balance_deduction"] is None
        assert job.public_dict()["units"] == 3.5
    finally:
        s3.close()


def _wait_succeeded(rt: Runtime, task_id: str) -> KlingTask:
    """The simulator's task once it succeeded (it takes ~0.1 s)."""

    def succeeded() -> KlingTask | None:
        task = rt.kling.get_task(task_id)
        return task if task.status == "succeed" else None

    return wait_until(succeeded, timeout=10, what=f"task {task_id} to succeed", interval=0.02)
