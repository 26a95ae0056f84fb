"""KLING_QUERY and callbacks-only mode (issue 9 item 8b), on the plain functions with the simulator and a real Redis.

A reseller may serve only the create: the relay then never reads a task back. The `auto` probe, the submit that
never sends an ambiguous create again, the copy that takes the succeed callback's URL, and the reconciler that
polls nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kling_relay.shared import heard, keys
from kling_relay.shared.jobs import JobState
from kling_relay.shared.jobs_model import CREATE_SENT
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.kling_reads import AUTH_FAILED, FOREIGN, MISSING, WORKS, probe_reads, reads_available
from kling_relay.shared.ops import submission_status
from kling_relay.shared.pipeline import RetryIn, apply_task_status, copy_job, submit_job
from kling_relay.shared.queue import COPY_QUEUE
from kling_relay.shared.reconcile import reconcile
from kling_relay.shared.runtime import Runtime
from tests.support.relay_runtime import close_runtime, make_runtime, new_job, relay_settings
from tests.support.s3 import MotoS3, moto_fixture
from tests.support.sim import UNIT_SIM_ARGS, SimHandle, sim_fixture

CREATE = "POST /v1/videos/multi-image2video"
GET_ONE = "GET /v1/videos/multi-image2video/{id}"
LIST = "GET /v1/videos/multi-image2video"
BUCKET = "videos"


sim = sim_fixture(*UNIT_SIM_ARGS, "--video-bytes", "3000")
moto = moto_fixture(bucket=BUCKET)


@pytest.fixture()
def runtime(redis_url: str, sim: SimHandle, moto: MotoS3, monkeypatch: pytest.MonkeyPatch,
            request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """KLING_QUERY=off unless `@pytest.mark.parametrize("runtime", [{...}], indirect=True)` says otherwise."""
    sim.reset()
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    env: dict[str, Any] = {"KLING_QUERY": "off", "KLING_RATE_LIMIT_PER_SECOND": "1000",
                           "S3_ENDPOINT_URL": moto.endpoint_url, **getattr(request, "param", {})}
    rt = make_runtime(relay_settings(redis_url, sim, **env))
    yield rt
    close_runtime(rt)


def task_of(sim: SimHandle, job_id: str) -> str:
    return str(sim.stats()["tasks_by_external_id"][job_id][0])


def wait_done(sim: SimHandle, task_id: str) -> dict[str, Any]:
    stats = sim.wait_for(lambda s: s["tasks"].get(task_id) in ("succeed", "failed"), timeout=30)
    assert stats["tasks"][task_id] == "succeed"
    return sim.task(task_id)


def notes(rt: Runtime, job_id: str) -> list[dict[str, Any]]:
    return [e.detail for e in rt.store.events(job_id) if e.from_state == e.to_state]


# --- KLING_QUERY=auto: the probe --------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "auto"}], indirect=True)
def test_auto_probes_once_and_shares_the_verdict(runtime: Runtime, sim: SimHandle) -> None:
    assert reads_available(runtime) is True
    assert sim.stats()["requests"] == {GET_ONE: 1, LIST: 1}  # an id that cannot exist, a page of one: no create
    assert runtime.redis.get(keys.KLING_READS) == "on"
    assert 0 < runtime.redis.ttl(keys.KLING_READS) <= 900
    assert reads_available(runtime) is True
    assert sim.stats()["requests"] == {GET_ONE: 1, LIST: 1}, "the kept verdict is used"


@pytest.mark.parametrize(("knobs", "get_by_id", "listing", "sent"), [
    ({"no_query": True}, MISSING, MISSING, "Invalid URL"),
    ({"foreign_answers": "query"}, MISSING, FOREIGN, '"success"'),  # its 404 for an unknown id is its own too
    ({"path_external_id": False, "no_query": False}, WORKS, WORKS, ""),
])
@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "auto"}], indirect=True)
def test_auto_reads_only_when_both_routes_answer_klings_envelope(runtime: Runtime, sim: SimHandle,
                                                                 knobs: dict[str, Any], get_by_id: str,
                                                                 listing: str, sent: str) -> None:
    sim.control(**knobs)
    probe = probe_reads(runtime.kling)
    assert (probe.get_by_id.verdict, probe.list.verdict) == (get_by_id, listing)
    assert sent in probe.get_by_id.detail and sent in probe.list.detail  # names what the gateway sent
    expected = listing == WORKS
    assert reads_available(runtime) is expected
    assert runtime.redis.get(keys.KLING_READS) == ("on" if expected else "off")
    assert CREATE not in sim.stats()["requests"]


@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "auto"}], indirect=True)
def test_auto_that_cannot_tell_reads_for_now_and_keeps_nothing(runtime: Runtime, sim: SimHandle) -> None:
    sim.control(force_error_code=1002, force_error_on="query")
    probe = probe_reads(runtime.kling)
    assert probe.get_by_id.verdict == AUTH_FAILED and probe.available is None
    assert reads_available(runtime) is True
    assert runtime.redis.get(keys.KLING_READS) is None


# --- submit: an ambiguous create is never sent again ---------------------------------------------------------------

@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "off"}, {"KLING_QUERY": "auto"}], indirect=True)
def test_an_ambiguous_create_without_reads_is_never_sent_again(runtime: Runtime, sim: SimHandle) -> None:
    """Issue 9.8b: without read routes no lookup can tell whether the task exists. The job must neither create again
    (a second paid task) nor spend its budget on lookups that cannot work (submit_exhausted, and the billed video
    lost): it waits for its callback, flagged for the operator."""
    sim.control(no_query=True, ambiguous_create_every_n=1)
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "awaiting"
    sim.control(ambiguous_create_every_n=0)
    for _ in range(3):
        assert submit_job(runtime, job.id) == "awaiting"
    after = runtime.store.require(job.id)
    assert after.state is JobState.QUEUED and after.error is None and after.kling_task_id is None
    assert after.attempts["submit"] == 1, "the create's attempt only: waiting spends none"
    assert sim.stats()["requests"].get(CREATE) == 1
    waiting = [n for n in notes(runtime, job.id) if n.get("waiting") == "callback"]
    assert len(waiting) == 1 and "create outcome unknown" in waiting[0]["why"]
    [flagged] = submission_status(runtime.store)["awaiting_callback"]
    assert flagged["job_id"] == job.id and "create outcome unknown" in flagged["message"]


def test_a_job_whose_create_may_have_been_sent_awaits_without_sending(runtime: Runtime, sim: SimHandle) -> None:
    """A worker killed mid-create leaves `create_sent`: in callbacks-only mode the next submit sends nothing."""
    job = new_job(runtime)
    runtime.store.bump_attempt(job.id, CREATE_SENT)
    assert submit_job(runtime, job.id) == "awaiting"
    assert sim.stats()["requests"] == {}


def test_a_refused_first_create_still_fails_and_a_throttled_one_is_sent_again(runtime: Runtime,
                                                                                sim: SimHandle) -> None:
    sim.control(rate_limit_first_n=1)
    job = new_job(runtime)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    assert submit_job(runtime, job.id) == "submitted"  # 1302: nothing was made, the create goes again
    sim.control(force_error_code=1301)
    refused = new_job(runtime)
    assert submit_job(runtime, refused.id) == "failed"
    assert runtime.store.require(refused.id).error["reason"] == "kling_rejected:1301"  # type: ignore[index]


def test_the_reconciler_leaves_a_flagged_job_waiting_until_reads_come_back(runtime: Runtime, sim: SimHandle) -> None:
    """Nothing to re-send while tasks cannot be read back: no submit message and no timeline note every pass."""
    sim.control(ambiguous_create_every_n=1)
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "awaiting"
    events_before = len(runtime.store.events(job.id))
    runtime.store.set_due(job.id, -1)
    report = reconcile(runtime)
    assert report.waiting == [job.id] and report.resubmitted == []
    assert runtime.redis.llen("submit") == 0 and len(runtime.store.events(job.id)) == events_before


def test_a_flagged_job_that_reaches_its_deadline_says_why(runtime: Runtime, sim: SimHandle) -> None:
    sim.control(ambiguous_create_every_n=1)
    job = new_job(runtime, deadline=0.5)
    assert submit_job(runtime, job.id) == "awaiting"
    time.sleep(0.6)
    assert job.id in reconcile(runtime).timed_out
    error = runtime.store.require(job.id).error
    assert error is not None and error["reason"] == "timed_out"
    assert "no callback bound its task" in error["message"] and "create outcome unknown" in error["message"]
    assert submission_status(runtime.store)["awaiting_callback"] == []


# --- what callbacks said, used once Kling's answer binds the task ---------------------------------------------------

@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "on"}], indirect=True)
def test_a_status_heard_before_the_task_was_bound_is_applied_once_it_is(runtime: Runtime, sim: SimHandle) -> None:
    """A callback that beats the create's answer (or comes while the worker backs off after a lost answer) changes
    nothing then; once Kling's answer binds that same task, its status is applied, and the copy is queued."""
    sim.control(ambiguous_create_every_n=1)
    job = new_job(runtime)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    task = KlingTask.from_json(wait_done(sim, task_of(sim, job.id)))
    assert heard.remember(runtime.redis, job.id, task, ttl_seconds=60)  # as the webhook keeps a callback
    made_up = KlingTask("made-up", "succeed", external_task_id=job.id)
    assert heard.remember(runtime.redis, job.id, made_up, ttl_seconds=60)  # a forged one: never used
    sim.control(ambiguous_create_every_n=0)
    assert submit_job(runtime, job.id) == "found"
    after = runtime.store.require(job.id)
    assert after.state is JobState.GENERATED and after.kling_task_id == task.task_id
    assert runtime.redis.llen(COPY_QUEUE) == 1


# --- the copy in callbacks-only mode ---------------------------------------------------------------------------

def generated_job(rt: Runtime, sim: SimHandle) -> tuple[str, KlingTask]:
    job = new_job(rt)
    assert submit_job(rt, job.id) == "submitted"
    task = KlingTask.from_json(wait_done(sim, task_of(sim, job.id)))
    return job.id, task


def test_the_copy_takes_the_succeed_callbacks_url_and_reads_nothing(runtime: Runtime, sim: SimHandle,
                                                                    moto: MotoS3) -> None:
    job_id, task = generated_job(runtime, sim)
    sim.control(no_query=True)
    heard.remember(runtime.redis, job_id, task, ttl_seconds=60)
    assert apply_task_status(runtime, job_id, task, source="callback").applied
    before = sim.stats()["requests"]
    assert copy_job(runtime, job_id) == "stored"
    assert sim.stats()["requests"] == {**before, "GET /_sim/videos/{task_id}/{video_id}.mp4": 1}, \
        "the video was downloaded, no read route was asked"
    stored = runtime.store.require(job_id)
    assert stored.state is JobState.STORED and stored.videos[0]["bytes"] == 3000
    served = sim.stats()["videos"][task.task_id][0]["sha256"]
    assert stored.videos[0]["sha256"] == served
    assert moto.client().head_object(Bucket=BUCKET, Key=stored.videos[0]["key"])["ContentLength"] == 3000


def test_the_copy_without_a_heard_url_retries(runtime: Runtime, sim: SimHandle) -> None:
    job_id, task = generated_job(runtime, sim)
    runtime.store.step(job_id, JobState.GENERATED, source="reconciler")
    with pytest.raises(RetryIn) as info:
        copy_job(runtime, job_id)
    assert "no succeed callback" in info.value.reason
    assert runtime.store.require(job_id).state is JobState.GENERATED


@pytest.mark.parametrize("runtime", [{"KLING_QUERY": "on", "COPY_MAX_ATTEMPTS": "1"}], indirect=True)
def test_a_gateway_answering_in_its_own_shape_is_named_in_the_jobs_error(runtime: Runtime, sim: SimHandle) -> None:
    """Issue 9.8c: the job's error says what the gateway sent instead of Kling's envelope (it used to say only
    "could not copy the video after 1 attempts")."""
    job_id, task = generated_job(runtime, sim)
    runtime.store.step(job_id, JobState.GENERATED, source="callback")
    sim.control(foreign_answers="query")
    assert copy_job(runtime, job_id) == "failed"
    error = runtime.store.require(job_id).error
    assert error is not None and error["reason"] == "copy_exhausted"
    assert "not a Kling envelope" in error["message"] and '"success": true' in error["message"]


# --- the reconciler in callbacks-only mode ---------------------------------------------------------------------

def test_the_reconciler_polls_nothing_without_reads(runtime: Runtime, sim: SimHandle) -> None:
    job_id, _ = generated_job(runtime, sim)
    runtime.store.set_due(job_id, -1)
    before = sim.stats()["requests"]
    report = reconcile(runtime)
    assert report.polled == [] and report.waiting == [job_id]
    assert sim.stats()["requests"] == before
    assert runtime.store.require(job_id).state is JobState.SUBMITTED


def test_a_paused_submission_probes_with_a_trial_without_reads(runtime: Runtime, sim: SimHandle) -> None:
    from kling_relay.shared import flow

    flow.pause(runtime.redis, code=1002, message="bad key")
    report = reconcile(runtime)
    assert report.probe == "trial" and sim.stats()["requests"] == {}
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "submitted"  # the trial create succeeds: submission resumes
    assert flow.current_pause(runtime.redis) is None


# --- binding from a callback ---------------------------------------------------------------------------------

def test_only_a_signed_callback_may_bind_a_job_whose_create_was_sent(runtime: Runtime) -> None:
    job = new_job(runtime)
    task = KlingTask("t-1", "processing", external_task_id=job.id)
    assert not heard.may_bind_from_callback(job, task, signed=True), "no create was sent"
    runtime.store.bump_attempt(job.id, CREATE_SENT)
    sent = runtime.store.require(job.id)
    assert heard.may_bind_from_callback(sent, task, signed=True)
    assert not heard.may_bind_from_callback(sent, task, signed=False), "a token alone never binds"
    other = KlingTask("t-1", "processing", external_task_id="job_other")
    assert not heard.may_bind_from_callback(sent, other, signed=True)
    assert runtime.store.set_kling_task_id(job.id, "t-0", source="worker")[0]
    assert not heard.may_bind_from_callback(runtime.store.require(job.id), task, signed=True)


def test_heard_keeps_few_entries_and_answers_the_most_advanced(runtime: Runtime, tmp_path: Path) -> None:
    job = new_job(runtime)
    for status in ("processing", "succeed", "submitted"):
        assert heard.remember(runtime.redis, job.id, KlingTask("t-1", status, external_task_id=job.id),  # type: ignore[arg-type]
                              ttl_seconds=60)
    found = heard.heard(runtime.redis, job.id, "t-1")
    assert found is not None and found.status == "succeed"
    assert heard.heard(runtime.redis, job.id, "t-2") is None
    for n in range(heard.MAX_HEARD):
        heard.remember(runtime.redis, job.id, KlingTask(f"forged-{n}", "succeed"), ttl_seconds=60)
    assert runtime.redis.hlen(keys.job_heard(job.id)) == heard.MAX_HEARD
    assert 0 < runtime.redis.ttl(keys.job_heard(job.id)) <= 60
