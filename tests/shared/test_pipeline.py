"""The submit and copy steps against the simulator and a real Redis: locks, pause, throttles, in-flight cap.

Each test calls the plain functions (no Celery worker); what they enqueue lands in the Redis broker lists.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kling_relay.shared import copy_flow, flow, keys, ops, overview
from kling_relay.shared.jobs import JobState
from kling_relay.shared.jobs_model import iso_utc
from kling_relay.shared.locks import job_lock
from kling_relay.shared.pipeline import RetryIn, copy_job, submit_job
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.storage import Storage
from tests.support.relay_runtime import (
    close_runtime,
    due_score,
    make_runtime,
    new_job,
    relay_settings,
    sim_requests,
)
from tests.support.s3 import MotoS3, S3Calls, moto_s3, no_credentials_client
from tests.support.sim import SimHandle, sim_fixture
from tests.support.waiting import wait_until

CREATE = "POST /v1/videos/multi-image2video"


sim = sim_fixture("--submitted-seconds", "0.1", "--processing-seconds", "0.1", "--callback-retries", "0")


@pytest.fixture()
def runtime(redis_url: str, sim: SimHandle, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """A Runtime; `@pytest.mark.parametrize("runtime", [{"ENV": "value"}], indirect=True)` overrides settings."""
    sim.reset()
    env: dict[str, Any] = getattr(request, "param", {})
    rt = make_runtime(relay_settings(redis_url, sim, **env))
    yield rt
    close_runtime(rt)


def events(rt: Runtime, job_id: str) -> list[dict[str, Any]]:
    return [e.as_dict() for e in rt.store.events(job_id)]


def test_submit_creates_one_task_and_records_it(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "submitted"
    after = runtime.store.require(job.id)
    assert after.state is JobState.SUBMITTED and after.kling_task_id
    assert sim.stats()["tasks_by_external_id"] == {job.id: [after.kling_task_id]}
    assert flow.in_flight(runtime.redis) == {"submitted": 1, "processing": 0, "reserved": 0}
    assert not job_lock(runtime.redis, "submit", job.id, 1).held_by_anyone()
    assert submit_job(runtime, job.id) == "skipped"


def test_1302_backs_off_without_using_an_attempt(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    sim.control(rate_limit_every_n=1)
    before = time.time()
    for _ in range(3):
        with pytest.raises(RetryIn) as info:
            submit_job(runtime, job.id)
    assert info.value.reason.startswith("retry_later")
    after = runtime.store.require(job.id)
    assert after.state is JobState.QUEUED
    assert after.attempts == {"submit": 3, "submit_throttled": 3}
    score = due_score(runtime.redis, job.id)
    assert score is not None and score >= before + runtime.settings.reconcile_quiet_seconds
    assert [e["detail"].get("throttled", "")[:11] for e in events(runtime, job.id)[1:]] == ["retry_later"] * 3

    sim.control(rate_limit_every_n=0)
    assert submit_job(runtime, job.id) == "submitted"
    requests_seen = sim_requests(sim)
    assert requests_seen == {CREATE: 4}, "no lookup after throttles: no create could have succeeded"
    assert len(sim.stats()["tasks_by_external_id"][job.id]) == 1


@pytest.mark.parametrize("runtime", [{"SUBMIT_MAX_ATTEMPTS": "2"}], indirect=True)
def test_throttles_never_exhaust_the_submit_budget(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    sim.control(rate_limit_every_n=1)
    for _ in range(5):
        with pytest.raises(RetryIn):
            submit_job(runtime, job.id)
    sim.control(rate_limit_every_n=0, server_error_every_n=1, server_error_code=5001)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)  # a real failed attempt: the first of two
    assert runtime.store.require(job.id).state is JobState.QUEUED
    assert submit_job(runtime, job.id) == "failed"
    failed = runtime.store.require(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error["reason"] == "submit_exhausted"


def test_account_error_pauses_submission_and_keeps_jobs_queued(runtime: Runtime, sim: SimHandle) -> None:
    first, second = new_job(runtime), new_job(runtime)
    sim.control(force_error_code=1101)
    assert submit_job(runtime, first.id) == "paused"
    job = runtime.store.require(first.id)
    assert job.state is JobState.QUEUED and job.error is None
    assert job.attempts == {"submit": 1, "submit_throttled": 1}
    note = events(runtime, first.id)[-1]
    assert note["detail"]["paused"] == "account" and note["detail"]["code"] == 1101
    status = flow.status(runtime.redis)
    assert status["submission"] == "paused"
    assert status["pause"]["code"] == 1101 and status["pause"]["reason"] == "account"
    assert status["pause"]["message"] and status["pause"]["job_id"] == first.id
    assert sim.stats()["error_codes"] == {"1101": 1}

    assert submit_job(runtime, second.id) == "paused"
    assert sim.stats()["requests"] == {CREATE: 1}, "a paused submit does not call Kling"
    assert runtime.store.require(second.id).state is JobState.QUEUED
    assert events(runtime, second.id)[-1]["detail"]["waiting"] == "submission paused"
    score = due_score(runtime.redis, second.id)
    assert score is not None and score <= time.time() + runtime.settings.kling_pause_probe_seconds

    flow.resume(runtime.redis, by="ops")
    sim.control(force_error_code=0)
    assert submit_job(runtime, first.id) == "submitted"
    assert submit_job(runtime, second.id) == "submitted"
    assert runtime.store.require(first.id).attempts["submit"] == 2


@pytest.mark.parametrize("code", [1002, 1304])
def test_auth_errors_pause_too(runtime: Runtime, sim: SimHandle, code: int) -> None:
    job = new_job(runtime)
    sim.control(force_error_code=code)
    assert submit_job(runtime, job.id) == "paused"
    assert flow.status(runtime.redis)["pause"]["reason"] == "auth"
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_a_trial_submit_resumes_submission_on_success(runtime: Runtime, sim: SimHandle) -> None:
    a, b = new_job(runtime), new_job(runtime)
    sim.control(force_error_code=1102)
    assert submit_job(runtime, a.id) == "paused"
    flow.open_trial(runtime.redis, 30)
    assert submit_job(runtime, a.id) == "paused", "the trial create failed again"
    assert flow.current_pause(runtime.redis)["hits"] == 2  # type: ignore[index]
    flow.open_trial(runtime.redis, 30)
    sim.control(force_error_code=0)
    assert submit_job(runtime, b.id) == "submitted"
    assert flow.status(runtime.redis)["submission"] == "open"
    assert submit_job(runtime, a.id) == "submitted"


def test_a_held_lock_means_busy_and_no_kling_call(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    other = job_lock(runtime.redis, "submit", job.id, 30)
    assert other.acquire()
    assert submit_job(runtime, job.id) == "busy"
    assert sim.stats()["requests"] == {}
    assert runtime.store.require(job.id).attempts == {}
    other.release()
    assert submit_job(runtime, job.id) == "submitted"


@pytest.mark.parametrize("runtime", [{"KLING_MAX_IN_FLIGHT": "1"}], indirect=True)
def test_in_flight_cap_holds_submits_back(runtime: Runtime, sim: SimHandle) -> None:
    a, b = new_job(runtime), new_job(runtime)
    assert submit_job(runtime, a.id) == "submitted"
    with pytest.raises(RetryIn) as info:
        submit_job(runtime, b.id)
    assert "in flight" in info.value.reason
    assert sim.stats()["requests"] == {CREATE: 1}
    assert runtime.store.require(b.id).attempts == {"submit_throttled": 1}
    runtime.store.step(a.id, JobState.GENERATED, source="callback")
    assert submit_job(runtime, b.id) == "submitted"


@pytest.mark.parametrize("runtime", [{"KLING_RATE_LIMIT_PER_SECOND": "0.02"}], indirect=True)
def test_shared_rate_limit_reschedules_without_sending(runtime: Runtime, sim: SimHandle) -> None:
    a, b = new_job(runtime), new_job(runtime)
    assert submit_job(runtime, a.id) == "submitted"
    with pytest.raises(RetryIn) as info:
        submit_job(runtime, b.id)
    assert info.value.seconds >= 40
    assert sim.stats()["requests"] == {CREATE: 1}
    assert runtime.store.require(b.id).attempts == {"submit": 1, "submit_throttled": 1}
    assert flow.in_flight(runtime.redis)["reserved"] == 0, "the reservation is released"


def test_ambiguous_create_is_looked_up_not_sent_again(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    sim.control(ambiguous_create_every_n=1)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    sim.control(ambiguous_create_every_n=0)
    assert submit_job(runtime, job.id) == "found"
    stats = sim.stats()
    assert len(stats["tasks_by_external_id"][job.id]) == 1
    assert stats["requests"][CREATE] == 1


@pytest.mark.parametrize("runtime", [{"KLING_MAX_IN_FLIGHT": "1"}], indirect=True)
def test_a_throttle_after_an_ambiguous_create_still_looks_first(runtime: Runtime, sim: SimHandle) -> None:
    """Throttles leave the attempt budget alone, and must not make the next submit forget the lost create."""
    job = new_job(runtime)
    sim.control(ambiguous_create_every_n=1)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    sim.control(ambiguous_create_every_n=0)
    other = new_job(runtime)
    assert flow.reserve_in_flight(runtime.redis, other.id, 1, 60)  # the cap is full now
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    flow.release_in_flight(runtime.redis, other.id)
    assert submit_job(runtime, job.id) == "found"
    stats = sim.stats()
    assert stats["tasks_by_external_id"][job.id] and len(stats["tasks_by_external_id"][job.id]) == 1
    assert stats["requests"][CREATE] == 1


def test_a_definite_refusal_needs_no_lookup(runtime: Runtime, sim: SimHandle) -> None:
    """1302 means Kling made nothing: the next submit creates at once, without a lookup first."""
    job = new_job(runtime)
    sim.control(rate_limit_every_n=1)
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    sim.control(rate_limit_every_n=0)
    assert submit_job(runtime, job.id) == "submitted"
    assert sim.stats()["requests"] == {CREATE: 2}


def test_copy_lock_held_means_busy(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "submitted"
    runtime.store.step(job.id, JobState.GENERATED, source="callback")
    lock = job_lock(runtime.redis, "copy", job.id, 30)
    assert lock.acquire()
    before = sim.stats()["requests"]
    assert copy_job(runtime, job.id) == "busy"
    assert sim.stats()["requests"] == before
    assert "copy" not in runtime.store.require(job.id).attempts


@pytest.mark.parametrize("runtime", [{"KLING_RATE_LIMIT_PER_SECOND": "0.02", "COPY_MAX_ATTEMPTS": "1"}],
                         indirect=True)
def test_copy_rate_limited_retries_without_using_its_attempt(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "submitted"  # takes the only slot
    runtime.store.step(job.id, JobState.GENERATED, source="callback")
    for _ in range(2):
        with pytest.raises(RetryIn):
            copy_job(runtime, job.id)
    after = runtime.store.require(job.id)
    assert after.state is JobState.GENERATED
    assert after.attempts["copy"] == 2 and after.attempts["copy_throttled"] == 2
    assert not job_lock(runtime.redis, "copy", job.id, 1).held_by_anyone()


def test_copy_refuses_a_task_that_belongs_to_another_job(runtime: Runtime, sim: SimHandle) -> None:
    """Whatever bound the task id, the copy re-reads the task and stores nothing that names another job."""
    owner = new_job(runtime)
    assert submit_job(runtime, owner.id) == "submitted"
    task_id = runtime.store.require(owner.id).kling_task_id
    assert task_id
    sim.wait_for(lambda stats: stats["tasks"].get(task_id) == "succeed", timeout=30)
    victim = new_job(runtime)
    assert runtime.store.set_kling_task_id(victim.id, task_id, source="worker")[0]
    for state in (JobState.SUBMITTED, JobState.GENERATED):
        runtime.store.step(victim.id, state, source="worker")
    assert copy_job(runtime, victim.id) == "failed"
    after = runtime.store.require(victim.id)
    assert after.state is JobState.FAILED and after.videos == []
    assert after.error is not None and "belongs to" in after.error["message"]


# --- a wrong setting never costs a video (issue 9.1 and 9.9) ---------------------------------------------------------

DEFAULT_ALLOWLIST = "*.klingai.com,*.kwimgs.com,*.inkwai.com"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


def with_storage(rt: Runtime, moto: MotoS3, bucket: str) -> Runtime:
    """The runtime, copying into `bucket` on moto (which need not exist)."""
    rt.storage = Storage(moto.client(), bucket, "relay/")
    return rt


def generated_job(rt: Runtime, sim: SimHandle, **kwargs: Any) -> str:
    """A job whose Kling task succeeded and that is `generated` (its callbacks went nowhere)."""
    job = new_job(rt, **kwargs)
    assert submit_job(rt, job.id) == "submitted"
    task_id = rt.store.require(job.id).kling_task_id
    assert task_id
    sim.wait_for(lambda stats: stats["tasks"].get(task_id) == "succeed", timeout=30)
    for state in (JobState.PROCESSING, JobState.GENERATED):
        rt.store.step(job.id, state, source="callback")
    return job.id


def objects(moto: MotoS3, bucket: str) -> list[str]:
    return [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.parametrize("runtime", [{"VIDEO_URL_ALLOWLIST": DEFAULT_ALLOWLIST, "COPY_MAX_ATTEMPTS": "1"}],
                         indirect=True)
def test_a_video_url_off_the_allowlist_waits_in_generated_until_the_list_is_widened(
        runtime: Runtime, sim: SimHandle, moto: MotoS3, redis_url: str) -> None:
    """Issue 9.1(b): a refused result URL used to fail the job at once (copy_exhausted) after Kling billed it. Now
    the job waits in `generated` with reason video_host_refused naming the host, uses no attempt, downloads
    nothing, and is copied by a worker whose allow-list is wider (as after the operator widens it and restarts)."""
    bucket = f"videos-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    with_storage(runtime, moto, bucket)
    job_id = generated_job(runtime, sim)
    before = time.time()
    for _ in range(3):  # COPY_MAX_ATTEMPTS is 1: a counted attempt would have failed the job
        assert copy_job(runtime, job_id) == "paused"
    job = runtime.store.require(job_id)
    assert job.state is JobState.GENERATED and job.error is None
    assert job.attempts["copy"] == job.attempts["copy_throttled"] == 3
    waits = [e["detail"] for e in events(runtime, job_id) if e["detail"].get("waiting")]
    assert waits == [{"waiting": "video_host_refused", "host": "127.0.0.1",
                      "message": f"{sim.root_url} is not on VIDEO_URL_ALLOWLIST"}], "one note when the wait begins"
    [waiting] = copy_flow.waiting(runtime.redis)
    assert (waiting["job_id"], waiting["reason"], waiting["host"]) == (job_id, "video_host_refused", "127.0.0.1")
    assert waiting["until"] is not None, "the simulator's URL carries its expiry (an hour)"
    score = due_score(runtime.redis, job_id)
    assert score is not None and before < score <= time.time() + runtime.settings.kling_pause_probe_seconds
    assert sim.stats()["downloads"] == {} and objects(moto, bucket) == []

    widened = with_storage(make_runtime(relay_settings(redis_url, sim, VIDEO_URL_ALLOWLIST=sim.root_url)), moto,
                           bucket)
    try:
        assert copy_job(widened, job_id) == "stored"
    finally:
        close_runtime(widened)
    stored = runtime.store.require(job_id)
    assert stored.state is JobState.STORED and len(stored.videos) == 1
    assert sorted(k.rsplit("/", 1)[1] for k in objects(moto, bucket)) == ["manifest.json", "video.mp4"]
    assert copy_flow.waiting(runtime.redis) == []


def test_a_stored_jobs_request_is_in_its_manifest_only_and_the_job_page_reads_it_there(
        redis_url: str, sim: SimHandle, moto: MotoS3) -> None:
    """Issue 11: a stored job kept its request (without base64 images) in Redis until it expired, though only the
    dashboard read it; the step into `stored` drops it, and the job page shows the manifest's."""
    bucket = f"videos-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    rt = with_storage(make_runtime(relay_settings(redis_url, sim, VIDEO_URL_ALLOWLIST=sim.root_url)), moto, bucket)
    try:
        job_id = generated_job(rt, sim)
        assert rt.store.request(job_id)["prompt"] == "a cat surfing"
        assert copy_job(rt, job_id) == "stored"
        assert not rt.redis.exists(keys.job_request(job_id))
        detail = overview.job_detail(rt, job_id)
        assert detail is not None and detail["manifest"] is not None
        assert detail["request"]["prompt"] == "a cat surfing" and detail["request"]["model_name"] == "kling-v1-6"
        assert detail["images"] == [{"removed": True}]
    finally:
        close_runtime(rt)


@pytest.mark.parametrize("runtime", [{"VIDEO_URL_ALLOWLIST": DEFAULT_ALLOWLIST}], indirect=True)
def test_a_refused_video_url_waits_until_its_expiry_then_fails(runtime: Runtime, sim: SimHandle) -> None:
    """Issue 9.1(b): the wait ends at the URL's expiry when it comes before the job's deadline."""
    sim.control(url_ttl=2)
    job_id = generated_job(runtime, sim, deadline=3600)
    assert copy_job(runtime, job_id) == "paused"
    [waiting] = copy_flow.waiting(runtime.redis)
    expiry = copy_flow.url_expiry(sim.task(job_id)["task_result"]["videos"][0]["url"])
    assert expiry is not None and waiting["until"] == iso_utc(expiry)
    score = due_score(runtime.redis, job_id)
    assert score is not None and score <= expiry + 0.01, "due again when the URL expires, not later"
    wait_until(lambda: time.time() > expiry, timeout=30, what="the video URL's expiry", interval=0.1)
    assert copy_job(runtime, job_id) == "failed"
    failed = runtime.store.require(job_id)
    assert failed.error is not None and failed.error["reason"] == "copy_exhausted"
    assert "expired" in failed.error["message"] and "127.0.0.1" in failed.error["message"]
    assert sim.stats()["downloads"] == {}


def test_no_bucket_pauses_copying_and_jobs_wait_in_generated(runtime: Runtime, sim: SimHandle,
                                                              moto: MotoS3) -> None:
    """Issue 9.9: with no bucket every job was generated (billed), then looped on NoSuchBucket and ended
    copy_exhausted. Now the first copy pauses copying (no attempt used), later copies skip without calling Kling,
    and the reconciler's storage probe resumes copying once the bucket exists."""
    from kling_relay.shared.reconcile import reconcile

    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with_storage(runtime, moto, bucket)
    first, second = generated_job(runtime, sim), generated_job(runtime, sim)
    assert copy_job(runtime, first) == "paused"
    pause = copy_flow.current_pause(runtime.redis)
    assert pause is not None and pause["reason"] == "storage" and pause["code"] == "NoSuchBucket"
    assert pause["job_id"] == first
    job = runtime.store.require(first)
    assert job.state is JobState.GENERATED and job.attempts["copy"] == job.attempts["copy_throttled"] == 1
    assert events(runtime, first)[-1]["detail"]["paused"] == "storage"
    assert ops.submission_status(runtime.store)["copy"] == "paused"

    kling_calls = sim_requests(sim)
    assert copy_job(runtime, second) == "paused"
    assert sim_requests(sim) == kling_calls, "a paused copy calls neither Kling nor S3"
    assert events(runtime, second)[-1]["detail"]["waiting"] == "copy paused"
    assert "copy" not in runtime.store.require(second).attempts

    for job_id in (first, second):
        runtime.store.set_due(job_id, -1)
    report = reconcile(runtime)
    assert report.copy_probe == "still_failing" and report.recopied == []
    assert sorted(report.waiting) == sorted([first, second])

    moto.client().create_bucket(Bucket=bucket)
    runtime.redis.delete("kr:flow:copy_probe")
    for job_id in (first, second):
        runtime.store.set_due(job_id, -1)
    report = reconcile(runtime)
    assert report.copy_probe == "resumed" and sorted(report.recopied) == sorted([first, second])
    assert copy_flow.current_pause(runtime.redis) is None
    assert [copy_job(runtime, first), copy_job(runtime, second)] == ["stored", "stored"]
    assert [k for k in objects(moto, bucket) if ".kling-relay-probe" in k] == [], "the probe cleans up"


def test_no_s3_credentials_pauses_copying(runtime: Runtime, sim: SimHandle, moto: MotoS3,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9.9: with no S3 credentials at all, the copy pauses (NoCredentials) instead of looping to
    copy_exhausted."""
    client = no_credentials_client(moto, monkeypatch)
    runtime.storage = Storage(client, "videos")
    job_id = generated_job(runtime, sim)
    assert copy_job(runtime, job_id) == "paused"
    pause = copy_flow.current_pause(runtime.redis)
    assert pause is not None and pause["code"] == "NoCredentials" and "no credentials" in pause["message"]
    assert runtime.store.require(job_id).state is JobState.GENERATED


@pytest.mark.parametrize("runtime", [{"KLING_MAX_IN_FLIGHT": "1"}], indirect=True)
def test_a_job_throttled_past_its_deadline_is_timed_out(runtime: Runtime, sim: SimHandle) -> None:
    """Throttles push the due time forward, but never past the deadline: the reconciler ends the job."""
    from kling_relay.shared.reconcile import reconcile

    job = new_job(runtime, deadline=1.0)
    other = new_job(runtime)
    assert flow.reserve_in_flight(runtime.redis, other.id, 1, 60)  # the cap stays full
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    score = due_score(runtime.redis, job.id)
    assert score is not None and score <= runtime.store.require(job.id).created_at + 1.0 + 1e-6
    time.sleep(1.1)  # deliberate: past the job's 1 s deadline, on the real clock the reconciler reads
    report = reconcile(runtime)
    assert job.id in report.timed_out
    after = runtime.store.require(job.id)
    assert after.state is JobState.FAILED and after.error is not None and after.error["reason"] == "timed_out"
    assert sim.stats()["requests"] == {}


def test_a_copy_that_overran_its_time_limit_counts_as_an_attempt(runtime: Runtime, sim: SimHandle) -> None:
    from kling_relay.shared.pipeline import copy_overran

    job = new_job(runtime)
    for state in (JobState.SUBMITTED, JobState.GENERATED):
        runtime.store.step(job.id, state, source="worker")
    runtime.store.bump_attempt(job.id, "copy")
    with pytest.raises(RetryIn):
        copy_overran(runtime, job.id)
    for _ in range(runtime.settings.copy_max_attempts):
        runtime.store.bump_attempt(job.id, "copy")
    assert copy_overran(runtime, job.id) == "failed"
    after = runtime.store.require(job.id)
    assert after.state is JobState.FAILED and after.error is not None
    assert after.error["reason"] == "copy_exhausted" and "time limit" in after.error["message"]
    assert copy_overran(runtime, "job_missing") == "skipped"


def test_a_refused_create_after_one_that_may_have_reached_kling_retries_instead_of_failing(
        runtime: Runtime, sim: SimHandle) -> None:
    """Kling keeps external_task_id unique: a refusal may be about our own earlier task, which the lookup has not
    seen yet. The job must not fail as kling_rejected while that task may exist (and be billed): the next attempt
    looks it up first. No Kling message text is read to decide."""
    job = new_job(runtime)
    runtime.store.bump_attempt(job.id, "create_sent")  # an earlier create's outcome is unknown
    sim.control(force_error_code=1201, force_error_on="create")
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    assert runtime.store.require(job.id).state is JobState.QUEUED
    assert sim.stats()["requests"][CREATE] == 1  # it looked first, found nothing, created, was refused


def test_a_refused_first_create_fails_the_job_with_klings_code(runtime: Runtime, sim: SimHandle) -> None:
    job = new_job(runtime)
    sim.control(force_error_code=1301, force_error_on="create")
    assert submit_job(runtime, job.id) == "failed"
    failed = runtime.store.require(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error["reason"] == "kling_rejected:1301"
    assert "create_sent" not in failed.attempts  # a definite refusal: no task exists, nothing to look up later


def test_1203_on_a_first_create_is_final(runtime: Runtime, sim: SimHandle) -> None:
    """Issue 9 item 3: 1203 on create ("resource does not exist", e.g. the model) was retried until the budget ran
    out (submit_exhausted after SUBMIT_MAX_ATTEMPTS creates); the same create can only be refused again."""
    job = new_job(runtime)
    sim.control(force_error_code=1203, force_error_on="create")
    assert submit_job(runtime, job.id) == "failed"
    failed = runtime.store.require(job.id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error["reason"] == "kling_rejected:1203" and failed.error["code"] == 1203
    assert sim_requests(sim) == {CREATE: 1}


def test_1203_on_a_create_after_one_that_may_have_reached_kling_still_retries(runtime: Runtime,
                                                                              sim: SimHandle) -> None:
    """As for any refusal: an earlier create may have made the task, so the next attempt looks it up first."""
    job = new_job(runtime)
    runtime.store.bump_attempt(job.id, "create_sent")
    sim.control(force_error_code=1203, force_error_on="create")
    with pytest.raises(RetryIn):
        submit_job(runtime, job.id)
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_1203_on_the_copys_re_read_retries_within_the_budget(runtime: Runtime, sim: SimHandle) -> None:
    """The copy never fails on Kling's word: a task Kling says it does not know is read again later."""
    job = new_job(runtime)
    assert submit_job(runtime, job.id) == "submitted"
    runtime.store.step(job.id, JobState.GENERATED, source="callback")
    sim.control(force_error_code=1203, force_error_on="query")
    with pytest.raises(RetryIn):
        copy_job(runtime, job.id)
    after = runtime.store.require(job.id)
    assert after.state is JobState.GENERATED and after.error is None


# --- the copy's S3 requests (issue 11: a fresh copy of a short video is two PutObjects) ------------------------------

class Killed(BaseException):
    """A worker dying where it is raised (nothing of the copy catches a BaseException that is not its own)."""


def copy_ready(runtime: Runtime, sim: SimHandle, moto: MotoS3) -> tuple[str, str, S3Calls]:
    bucket = f"videos-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    with_storage(runtime, moto, bucket)
    sim.control(video_bytes=1024)
    job_id = generated_job(runtime, sim)
    return job_id, bucket, S3Calls(runtime.storage.s3)


def test_the_first_copy_of_a_short_video_makes_two_s3_requests(runtime: Runtime, sim: SimHandle,
                                                                moto: MotoS3) -> None:
    """Issue 11: it made seven (GET manifest, LIST uploads, create, part, complete, HEAD, manifest PUT)."""
    job_id, bucket, calls = copy_ready(runtime, sim, moto)
    assert copy_job(runtime, job_id) == "stored"
    assert calls.take() == ["PutObject", "PutObject"]  # the video, then the manifest (conditional, last)
    assert sorted(k.rsplit("/", 1)[1] for k in objects(moto, bucket)) == ["manifest.json", "video.mp4"]
    [video] = runtime.store.require(job_id).videos
    assert video["bytes"] == 1024
    assert moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_copy_killed_between_the_video_and_the_manifest_is_finished_by_the_next_one(
        runtime: Runtime, sim: SimHandle, moto: MotoS3) -> None:
    """The next run is not fresh: it reads the manifest (none), lists stale uploads, writes the video again and the
    manifest; the job is stored once, with one manifest."""
    job_id, bucket, calls = copy_ready(runtime, sim, moto)
    storage = runtime.storage

    def killed(*args: Any, **kwargs: Any) -> bool:
        raise Killed

    storage.write_manifest = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        copy_job(runtime, job_id)
    assert calls.take() == ["PutObject"]
    assert [k.rsplit("/", 1)[1] for k in objects(moto, bucket)] == ["video.mp4"]
    assert runtime.store.require(job_id).state is JobState.GENERATED
    del storage.write_manifest

    assert copy_job(runtime, job_id) == "stored"
    assert calls.take() == ["GetObject", "ListMultipartUploads", "PutObject", "PutObject"]
    assert sorted(k.rsplit("/", 1)[1] for k in objects(moto, bucket)) == ["manifest.json", "video.mp4"]
    manifest = runtime.storage.read_manifest(job_id, runtime.store.require(job_id).created_at)
    assert manifest is not None and manifest["videos"] == runtime.store.require(job_id).videos


def test_an_ops_retry_keeps_that_a_copy_ran_so_the_next_copy_is_careful(runtime: Runtime, sim: SimHandle,
                                                                         moto: MotoS3) -> None:
    """The retry clears the attempt counters; `copy_ran` keeps the copy from taking the fresh path, which would
    neither read the manifest nor look for uploads an earlier copy left open."""
    job_id, bucket, calls = copy_ready(runtime, sim, moto)
    runtime.store.bump_attempt(job_id, "copy")  # a copy ran (and, say, died)
    runtime.store.step(job_id, JobState.FAILED, source="worker", set_fields={"error": {"reason": "copy_exhausted"}})
    assert runtime.store.retry(job_id, source="api").applied
    job = runtime.store.require(job_id)
    assert job.copy_ran and "copy" not in job.attempts
    runtime.store.step(job_id, JobState.GENERATED, source="api", only_from=[JobState.QUEUED])
    assert copy_job(runtime, job_id) == "stored"
    assert calls.take() == ["GetObject", "ListMultipartUploads", "PutObject", "PutObject"]


def test_a_retry_of_a_job_whose_copy_never_ran_keeps_the_fresh_path(runtime: Runtime) -> None:
    job = new_job(runtime)
    runtime.store.step(job.id, JobState.FAILED, source="worker", set_fields={"error": {"reason": "x"}})
    assert runtime.store.retry(job.id, source="api").applied
    assert not runtime.store.require(job.id).copy_ran
