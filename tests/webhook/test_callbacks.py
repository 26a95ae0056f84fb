"""The callback endpoint over a real redis-server: who may move a job, and what bodies are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import jsonify, request
from flask.testing import FlaskClient

from kling_relay.shared import heard
from kling_relay.shared.jobs import JobState
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.pipeline import CREATE_SENT, record_task
from kling_relay.shared.queue import COPY_QUEUE
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import Secret
from kling_relay.shared.tokens import callback_token
from kling_relay.webhook.app import create_app
from tests.support import promtool
from tests.webhook.conftest import CALLBACK_SECRET, app_settings, auth, open_runtime

REQUEST = {"model_name": "kling-v1-6", "image_list": [{"image": "https://img.example.com/a.png"}], "prompt": "p",
           "mode": "std", "duration": "5", "aspect_ratio": "16:9"}


def _task(task_id: str, status: str, external: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": ""}
    if external is not None:
        task["task_info"] = {"external_task_id": external}
    return task


def _post(client: FlaskClient, job_id: str, body: Any, **kwargs: Any) -> Any:
    token = callback_token(Secret(CALLBACK_SECRET), job_id)
    return client.post(f"/callbacks/kling/{job_id}?token={token}", json=body, **kwargs)


def test_a_token_alone_cannot_bind_a_job_to_another_task(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    for body in (_task("task-of-another-job", "succeed", None),
                 _task("task-of-another-job", "processing", "job_someone_else")):
        answer = _post(client, job.id, body)
        assert answer.status_code == 409, answer.json
    after = runtime.store.require(job.id)
    assert after.state is JobState.QUEUED and after.kling_task_id is None


def test_a_forged_callback_before_the_task_is_recorded_changes_nothing(client: FlaskClient,
                                                                     runtime: Runtime) -> None:
    """Issue 7 item 6: a stolen token, `external_task_id` = the job id and a made-up task_id used to bind the job
    (it went `processing` with kling_task_id "attacker-made-up"; the real create's record then only logged an
    error and the billed task was orphaned). Now nothing changes and the worker's real task wins."""
    job, _ = runtime.store.create(dict(REQUEST))
    for status in ("submitted", "processing", "succeed", "failed"):
        answer = _post(client, job.id, _task("attacker-made-up", status, job.id))
        assert answer.status_code == 202, answer.json
        assert answer.json["applied"] is False and answer.json["state"] == "queued"
    after = runtime.store.require(job.id)
    assert after.state is JobState.QUEUED and after.kling_task_id is None and after.error is None
    assert [e.to_state for e in runtime.store.events(job.id)] == ["queued"]  # the creation event only
    assert runtime.redis.llen(COPY_QUEUE) == 0

    record_task(runtime, job.id, KlingTask("real-task", "submitted", external_task_id=job.id),
                source="worker", detail={"created": True})
    after = runtime.store.require(job.id)
    assert after.state is JobState.SUBMITTED and after.kling_task_id == "real-task"
    assert _post(client, job.id, _task("attacker-made-up", "succeed", job.id)).status_code == 409
    answer = _post(client, job.id, _task("real-task", "processing", job.id))
    assert answer.status_code == 200 and answer.json["applied"] is True
    assert runtime.store.require(job.id).kling_task_id == "real-task"


def test_a_callback_before_the_record_makes_a_job_with_a_create_sent_due_now(client: FlaskClient,
                                                                            runtime: Runtime) -> None:
    """A create may have reached Kling (its answer lost): the reconciler re-sends the submit, which looks first."""
    untouched, _ = runtime.store.create(dict(REQUEST), due_in=120)
    sent, _ = runtime.store.create(dict(REQUEST), due_in=120)
    runtime.store.bump_attempt(sent.id, CREATE_SENT)
    for job in (untouched, sent):
        assert _post(client, job.id, _task("t-1", "processing", job.id)).status_code == 202
    assert runtime.store.due(limit=10) == [sent.id]
    assert runtime.store.require(sent.id).state is JobState.QUEUED


def test_a_callback_for_an_ended_job_without_a_task_changes_nothing(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    runtime.store.step(job.id, JobState.CANCELED, source="api")
    answer = _post(client, job.id, _task("t-1", "succeed", job.id))
    assert answer.status_code == 200 and answer.json == {"ok": True, "applied": False, "state": "canceled"}
    assert runtime.store.require(job.id).kling_task_id is None


def test_a_lone_surrogate_in_task_status_msg_is_stored_made_safe(client: FlaskClient, runtime: Runtime) -> None:
    """Issue 7 item 2: `"\\ud800"` in a failed callback's task_status_msg was a 500 that Kling would retry forever."""
    job, _ = runtime.store.create(dict(REQUEST))
    runtime.store.step(job.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "t-1"})
    body = {**_task("t-1", "failed", job.id), "task_status_msg": "bad \ud800 image"}
    answer = _post(client, job.id, body)
    assert answer.status_code == 200 and answer.json["state"] == "failed", answer.json
    after = runtime.store.require(job.id)
    assert after.error is not None and after.error["message"] == "bad \ufffd image"
    bad_id = _post(client, job.id, {**_task("t-1", "failed", job.id), "task_id": "t\ud800"})
    assert bad_id.status_code == 400


def test_bodies_that_are_not_task_objects(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    token = callback_token(Secret(CALLBACK_SECRET), job.id)
    url = f"/callbacks/kling/{job.id}?token={token}"
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post(url, data=deep, content_type="application/json").status_code in (400, 413)
    assert client.post(url, data=b"[" * 200_000, content_type="application/json").status_code == 400
    infinite = b'{"task_id": "t", "task_status": "succeed", "created_at": Infinity}'
    assert client.post(url, data=infinite, content_type="application/json").status_code == 400
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_job_ids_are_matched_whole(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    job_id = job.id + "\n"
    token = callback_token(Secret(CALLBACK_SECRET), job_id)
    answer = client.post(f"/callbacks/kling/{job_id}?token={token}", json=_task("t", "succeed", job.id))
    assert answer.status_code == 403


def test_store_down_is_503_with_retry_after(client: FlaskClient, runtime: Runtime, redis_url: str) -> None:
    from tests.support.procs import free_port

    runtime.store._r.connection_pool.connection_kwargs["port"] = free_port()  # nothing listens there
    runtime.store._r.connection_pool.disconnect()
    answer = _post(client, "job_whatever", _task("t", "succeed", "job_whatever"))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "unavailable" in answer.json["error"]


def test_callbacks_are_kept_for_callbacks_only_mode(client: FlaskClient, runtime: Runtime) -> None:
    """Issue 9.8b: the copy takes the video URL from the succeed callback when Kling's tasks cannot be read back, so
    the webhook keeps what each accepted callback said (before its step), and nothing a 409 refused."""
    from kling_relay.shared import heard

    job, _ = runtime.store.create(dict(REQUEST))
    early = _task("real-task", "processing", job.id)
    assert _post(client, job.id, early).status_code == 202  # before the task is recorded: kept, not applied
    record_task(runtime, job.id, KlingTask("real-task", "submitted", external_task_id=job.id),
                source="worker", detail={"created": True})
    succeed = {**_task("real-task", "succeed", job.id),
               "task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    assert _post(client, job.id, succeed).status_code == 200
    assert _post(client, job.id, {**succeed, "task_id": "another-task"}).status_code == 409
    kept = heard.heard(runtime.redis, job.id, "real-task")
    assert kept is not None and kept.status == "succeed" and kept.videos[0].url == "https://cdn.example.com/v1.mp4"
    assert heard.heard(runtime.redis, job.id, "another-task") is None
    assert runtime.store.require(job.id).state is JobState.GENERATED


def test_duplicated_callbacks_bill_a_job_once_in_its_view_and_the_status(client: FlaskClient,
                                                                          runtime: Runtime) -> None:
    """Issue 9 item 6: Kling's `final_unit_deduction` (and a callback's `final_balance_deduction`) is kept on the
    job, shown in its API view, and counted once in the units spent today and this month, however often the
    finished task is posted."""
    job, _ = runtime.store.create(dict(REQUEST))
    other, _ = runtime.store.create(dict(REQUEST))
    for each in (job, other):
        record_task(runtime, each.id, KlingTask(f"task-{each.id}", "submitted", external_task_id=each.id),
                    source="worker", detail={"created": True})
    finished = {**_task(f"task-{job.id}", "succeed", job.id), "final_unit_deduction": "2",
                "final_balance_deduction": "0.28"}
    answers = [_post(client, job.id, finished) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json["applied"] for a in answers] == [True, False, False]
    failed = {**_task(f"task-{other.id}", "failed", other.id), "final_unit_deduction": 0.5}
    assert _post(client, other.id, failed).status_code == 200
    assert _post(client, other.id, {**failed, "final_unit_deduction": "not a number"}).status_code == 200

    view = client.get(f"/v1/jobs/{job.id}", headers=auth()).json
    assert view["units"] == 2 and view["balance_deduction"] == 0.28
    assert client.get(f"/v1/jobs/{other.id}", headers=auth()).json["units"] == 0.5
    listed = {j["id"]: j["units"] for j in client.get("/v1/jobs", headers=auth()).json["jobs"]}
    assert listed == {job.id: 2, other.id: 0.5}
    status = client.get("/v1/status", headers=auth()).json
    assert status["units"]["today"] == 2.5 and status["units"]["month"] == 2.5
    assert status["units"]["budget_override"] is False


# --- signed callbacks (KLING_WEBHOOK_SECRET, issue 9 item 7) --------------------------------------------------

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"kling-console-signing-key-0123").decode()


def _signed(body: bytes, *, secret: bytes = base64.b64decode(WEBHOOK_SECRET[6:]), msg_id: str = "msg_1",
            at: float | None = None) -> dict[str, str]:
    """Standard Webhooks headers computed here by hand, as Kling's console-secret signing describes them."""
    stamp = int(time.time() if at is None else at)
    digest = hmac.new(secret, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


@pytest.fixture()
def signed_runtime(redis_url: str) -> Iterator[Runtime]:
    with open_runtime(app_settings(redis_url, KLING_WEBHOOK_SECRET=WEBHOOK_SECRET)) as rt:
        yield rt


@pytest.fixture()
def signed_client(signed_runtime: Runtime) -> FlaskClient:
    return create_app(runtime=signed_runtime).test_client()


def _submitted_job(rt: Runtime) -> str:
    job, _ = rt.store.create(dict(REQUEST))
    rt.store.step(job.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "t-1"})
    return job.id


def _post_raw(client: FlaskClient, job_id: str, body: bytes, headers: dict[str, str]) -> Any:
    token = callback_token(Secret(CALLBACK_SECRET), job_id)
    return client.post(f"/callbacks/kling/{job_id}?token={token}", data=body, content_type="application/json",
                       headers=headers)


def test_a_well_signed_callback_is_applied(signed_client: FlaskClient, signed_runtime: Runtime) -> None:
    job_id = _submitted_job(signed_runtime)
    body = json.dumps(_task("t-1", "processing", job_id)).encode()
    answer = _post_raw(signed_client, job_id, body, _signed(body))
    assert answer.status_code == 200 and answer.json["applied"] is True
    assert signed_runtime.store.require(job_id).state is JobState.PROCESSING
    several = _signed(body, msg_id="msg_2")  # a signature list with a rotated-out key first
    several["webhook-signature"] = "v1,bm90LXRoaXMtb25l " + several["webhook-signature"]
    assert _post_raw(signed_client, job_id, body, several).status_code == 200


@pytest.mark.parametrize("case", ["bad", "stale", "future", "missing", "body-changed", "no-id"])
def test_a_callback_without_a_valid_signature_is_refused_and_changes_nothing(
        signed_client: FlaskClient, signed_runtime: Runtime, case: str) -> None:
    """With KLING_WEBHOOK_SECRET set, the job's token alone is no longer enough: a wrong key, a timestamp more
    than five minutes off, a missing signature or a body other than the one signed is 401."""
    job_id = _submitted_job(signed_runtime)
    body = json.dumps(_task("t-1", "succeed", job_id)).encode()
    headers = {
        "bad": _signed(body, secret=b"another-secret"),
        "stale": _signed(body, at=time.time() - 301),
        "future": _signed(body, at=time.time() + 301),
        "missing": {},
        "body-changed": _signed(json.dumps(_task("t-1", "processing", job_id)).encode()),
        "no-id": {k: v for k, v in _signed(body).items() if k != "webhook-id"},
    }[case]
    answer = _post_raw(signed_client, job_id, body, headers)
    assert answer.status_code == 401 and "signature" in answer.json["error"]
    after = signed_runtime.store.require(job_id)
    assert after.state is JobState.SUBMITTED and [e.to_state for e in signed_runtime.store.events(job_id)] == [
        "queued", "submitted"]
    assert signed_runtime.redis.llen(COPY_QUEUE) == 0


def test_a_signed_callback_still_needs_the_jobs_token(signed_client: FlaskClient, signed_runtime: Runtime) -> None:
    job_id = _submitted_job(signed_runtime)
    body = json.dumps(_task("t-1", "succeed", job_id)).encode()
    answer = signed_client.post(f"/callbacks/kling/{job_id}?token=wrong", data=body,
                                content_type="application/json", headers=_signed(body))
    assert answer.status_code == 403
    assert signed_runtime.store.require(job_id).state is JobState.SUBMITTED


def test_without_a_webhook_secret_signatures_are_not_required(client: FlaskClient, runtime: Runtime) -> None:
    job_id = _submitted_job(runtime)
    body = json.dumps(_task("t-1", "processing", job_id)).encode()
    assert _post_raw(client, job_id, body, {}).status_code == 200


def _callback_counts(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    return {o: promtool.value(text, "kling_relay_callbacks_total", outcome=o) for o in ("duplicate", "stale")}


def test_a_duplicate_or_stale_callback_is_answered_without_the_state_script(
        client: FlaskClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 (callbacks at 0.45x a no-op endpoint): a duplicate or stale callback ran the step script (a second
    round trip returning the whole job) after reading the job. Now the job read decides: no step, nothing
    changes, the outcome is counted, the callback is still kept (`heard`) and its bill still recorded."""
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    assert _post(client, job.id, _task("task-1", "processing", job.id)).json["applied"] is True
    steps: list[JobState] = []
    real_step = runtime.store.step

    def spy(job_id: str, to: JobState, **kwargs: Any) -> Any:
        steps.append(to)
        return real_step(job_id, to, **kwargs)

    monkeypatch.setattr(runtime.store, "step", spy)
    before_job, before_events = runtime.store.require(job.id), runtime.store.events(job.id)
    before = _callback_counts(client)
    for status in ("processing", "submitted", "processing"):
        answer = _post(client, job.id, _task("task-1", status, job.id))
        assert answer.status_code == 200 and answer.json == {"ok": True, "applied": False, "state": "processing"}
    assert steps == []
    after = _callback_counts(client)
    assert after["duplicate"] - before["duplicate"] == 2 and after["stale"] - before["stale"] == 1
    assert runtime.store.require(job.id) == before_job and runtime.store.events(job.id) == before_events
    assert heard.heard(runtime.redis, job.id, "task-1") is not None  # the callbacks are still kept

    # stale after the job is finished: still no step, but what Kling billed is recorded (once)
    runtime.store.step(job.id, JobState.FAILED, source="worker", set_fields={"error": {"code": "x"}})
    late = {**_task("task-1", "succeed", job.id), "final_unit_deduction": "2"}
    for _ in range(2):
        answer = _post(client, job.id, late)
        assert answer.status_code == 200 and answer.json["applied"] is False and answer.json["state"] == "failed"
    assert steps == [JobState.FAILED]  # the test's own step only
    assert runtime.store.require(job.id).units == 2.0
    assert _callback_counts(client)["stale"] - after["stale"] == 2


def test_a_callback_that_moves_the_job_still_runs_the_step(client: FlaskClient, runtime: Runtime) -> None:
    """The fast path is only for steps that cannot apply: a forward status and a failure still step the job."""
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    assert _post(client, job.id, _task("task-1", "processing", job.id)).json["applied"] is True
    answer = _post(client, job.id, _task("task-1", "failed", job.id))
    assert answer.json["applied"] is True and answer.json["state"] == "failed"
    assert runtime.store.require(job.id).state is JobState.FAILED


def test_a_callback_racing_the_workers_record_is_applied_by_one_of_them(client: FlaskClient, runtime: Runtime,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 (one bench job of 200 never stored without the reconciler): the webhook read the job unbound; the
    worker then bound the task and looked for early callbacks (none yet); only then did the webhook keep the
    `succeed`: neither side applied it and the job waited `submitted` for the reconciler. The webhook now keeps the
    callback first and reads the binding again."""
    from kling_relay.shared.pipeline import apply_task_status

    job, _ = runtime.store.create(dict(REQUEST))
    runtime.store.bump_attempt(job.id, CREATE_SENT)
    keep = heard.remember
    raced: list[bool] = []

    def worker_records_meanwhile(client_: Any, job_id: str, task: KlingTask, *, ttl_seconds: int) -> bool:
        if not raced:  # the worker's whole record (submit._record) runs between the webhook's read and its keep
            raced.append(True)
            record_task(runtime, job.id, KlingTask("real-task", "submitted", external_task_id=job.id),
                        source="worker", detail={"created": True})
            later = heard.heard(runtime.redis, job.id, "real-task")
            if later is not None and heard.is_beyond(later, KlingTask("real-task", "submitted")):
                apply_task_status(runtime, job.id, later, source="callback")
        return keep(client_, job_id, task, ttl_seconds=ttl_seconds)

    monkeypatch.setattr(heard, "remember", worker_records_meanwhile)
    succeed = {**_task("real-task", "succeed", job.id),
               "task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    answer = _post(client, job.id, succeed)
    assert raced and answer.status_code == 200, answer.json
    assert runtime.store.require(job.id).state is JobState.GENERATED


def _redis_calls(runtime: Runtime) -> int:
    """Commands Redis has run so far, INFO itself excluded."""
    stats = runtime.redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def test_a_repeat_this_process_saw_is_answered_without_redis(client: FlaskClient, runtime: Runtime) -> None:
    """Issue 11: a repeated `processing` or a stale `submitted`, for the task this process just saw the job bound
    to, changes nothing; it is answered from the process's memory (shared/recent.py), without a Redis command, and
    still counted."""
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    assert _post(client, job.id, _task("task-1", "processing", job.id)).json["applied"] is True
    before_job, before_events = runtime.store.require(job.id), runtime.store.events(job.id)
    before_counts = _callback_counts(client)
    calls = _redis_calls(runtime)
    for status in ("processing", "submitted", "processing"):
        answer = _post(client, job.id, _task("task-1", status, job.id))
        assert answer.status_code == 200 and answer.json == {"ok": True, "applied": False, "state": "processing"}
    assert _redis_calls(runtime) == calls
    after_counts = _callback_counts(client)
    assert after_counts["duplicate"] - before_counts["duplicate"] == 2
    assert after_counts["stale"] - before_counts["stale"] == 1
    assert runtime.store.require(job.id) == before_job and runtime.store.events(job.id) == before_events


def test_a_repeat_that_may_matter_still_reads_the_job(client: FlaskClient, runtime: Runtime) -> None:
    """The memory answers only what it can prove: another task is refused, a forward status is applied, a repeated
    `succeed` (its URLs are kept for callbacks-only mode) or one carrying a bill reads Redis, and a remembered
    `failed` (the operators may retry the job) is never used."""
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    assert _post(client, job.id, _task("task-1", "processing", job.id)).json["applied"] is True
    assert _post(client, job.id, _task("task-2", "processing", job.id)).status_code == 409
    video = {"task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    assert _post(client, job.id, {**_task("task-1", "succeed", job.id), **video}).json["applied"] is True
    fresher = {"task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1-new.mp4",
                                           "duration": "5"}]}}
    calls = _redis_calls(runtime)
    answer = _post(client, job.id, {**_task("task-1", "succeed", job.id), **fresher})
    assert answer.status_code == 200 and answer.json["applied"] is False and _redis_calls(runtime) > calls
    calls = _redis_calls(runtime)
    billed = {**_task("task-1", "processing", job.id), "final_unit_deduction": "3"}
    assert _post(client, job.id, billed).json["applied"] is False and _redis_calls(runtime) > calls
    assert runtime.store.require(job.id).units == 3.0

    other, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, other.id, KlingTask("task-9", "submitted", external_task_id=other.id), source="worker",
                detail={})
    assert _post(client, other.id, _task("task-9", "failed", other.id)).json["state"] == "failed"
    calls = _redis_calls(runtime)
    assert _post(client, other.id, _task("task-9", "processing", other.id)).json["state"] == "failed"
    assert _redis_calls(runtime) > calls


def test_a_callback_after_the_job_is_stored_keeps_nothing(runtime: Runtime) -> None:
    """The step into `stored` deletes what the callbacks said (nothing reads it after that); a late callback used
    to write it again, kept for the job's whole TTL."""
    from kling_relay.shared import keys

    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    client = create_app(runtime=runtime).test_client()
    assert _post(client, job.id, _task("task-1", "processing", job.id)).json["applied"] is True
    assert runtime.redis.exists(keys.job_heard(job.id))
    runtime.store.step(job.id, JobState.STORED, source="worker")
    assert not runtime.redis.exists(keys.job_heard(job.id))
    late = {**_task("task-1", "succeed", job.id),
            "task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    for fresh in (create_app(runtime=runtime).test_client(), client):  # a process that never saw it, and one that did
        answer = fresh.post(f"/callbacks/kling/{job.id}?token={callback_token(Secret(CALLBACK_SECRET), job.id)}",
                            json=late)
        assert answer.status_code == 200 and answer.json["state"] == "stored"
    assert not runtime.redis.exists(keys.job_heard(job.id))


def test_a_repeat_is_answered_before_flask_with_the_views_own_answer(runtime: Runtime) -> None:
    """Issue 11: a callback for a job bound to its task, a provable repeat or a step, is answered by
    `BoundCallbacksFirst`, before Flask builds a request (none of the app's request hooks runs), with the bytes the
    view answers, the caller's X-Request-ID, and counted; a bad token, a body that is not a task and another job's
    task still reach the view."""
    app = create_app(runtime=runtime)
    reached: list[str] = []
    app.before_request(lambda: reached.append(request.path) and None)  # type: ignore[func-returns-value]
    client = app.test_client()
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    stepped = _post(client, job.id, _task("task-1", "processing", job.id), headers={"X-Request-ID": "kling-41"})
    assert reached == [] and stepped.json["applied"] is True and stepped.headers["X-Request-ID"] == "kling-41"
    before = _callback_counts(client)
    reached.clear()
    answer = _post(client, job.id, _task("task-1", "processing", job.id), headers={"X-Request-ID": "kling-42"})
    assert reached == [] and answer.status_code == 200
    with app.app_context():
        assert stepped.get_data() == jsonify(ok=True, applied=True, state="processing").get_data()
        assert answer.get_data() == jsonify(ok=True, applied=False, state="processing").get_data()
    assert answer.headers["Content-Type"] == "application/json" and answer.headers["X-Request-ID"] == "kling-42"
    assert _callback_counts(client)["duplicate"] - before["duplicate"] == 1
    reached.clear()
    assert client.post(f"/callbacks/kling/{job.id}?token=wrong", json=_task("task-1", "processing", job.id)
                       ).status_code == 403
    assert _post(client, job.id, {"task_id": "task-1"}).status_code == 400
    assert _post(client, job.id, _task("task-1", "processing", "job_someone_else")).status_code == 409
    assert len(reached) == 3  # the view answered each of them
    assert _post(client, job.id, _task("task-1", "failed", job.id)).json["applied"] is True
    assert len(reached) == 3 and runtime.store.require(job.id).state is JobState.FAILED


def _twin_script(job_id: str) -> list[dict[str, Any]]:
    """Callbacks for one job bound to task-1: steps, duplicates, stale ones, bills, another task, a late failure."""
    video = {"task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    succeed = {**_task("task-1", "succeed", job_id), **video, "final_unit_deduction": "1"}
    return [_task("task-1", "submitted", job_id), _task("task-1", "processing", job_id),
            _task("task-1", "processing", job_id), _task("task-1", "submitted", None),
            _task("task-2", "processing", job_id), succeed, succeed, _task("task-1", "processing", job_id),
            {**_task("task-1", "failed", job_id), "task_status_msg": "late"}, {"task_id": "task-1"}]


def _timeline(runtime: Runtime, job_id: str) -> list[tuple[Any, ...]]:
    return [(e.from_state, e.to_state, e.source, json.dumps(e.detail, sort_keys=True))
            for e in runtime.store.events(job_id)]


def _all_counts(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    return {o: promtool.value(text, "kling_relay_callbacks_total", outcome=o)
            for o in ("applied", "duplicate", "stale", "early", "refused")}


def test_the_fast_path_answers_and_records_as_the_view_does(runtime: Runtime) -> None:
    """Issue 11: what BoundCallbacksFirst answers, steps included, is what the view answers. The same callbacks sent
    to two twin jobs, one through the app and one through the view alone (the app without BoundCallbacksFirst, as a
    body without a length reaches it), give the same answers, the same jobs (state, task, error, bill), the same
    timelines, the same callbacks kept (`heard`), the same counts and the same copies queued."""
    fast_app = create_app(runtime=runtime)
    view_app = create_app(runtime=runtime)
    view_app.wsgi_app = view_app.wsgi_app.wsgi_app  # type: ignore[attr-defined,method-assign]  # Flask's own
    seen: dict[str, Any] = {}
    for name, app in (("fast", fast_app), ("view", view_app)):
        client = app.test_client()
        job, _ = runtime.store.create(dict(REQUEST))
        record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                    detail={})
        before = _all_counts(client)
        answers = []
        for i, body in enumerate(_twin_script(job.id)):
            answer = _post(client, job.id, body, headers={"X-Request-ID": f"twin-{i}"})
            answers.append((answer.status_code, answer.get_data(), answer.headers.get("X-Request-ID")))
        after = _all_counts(client)
        public = runtime.store.require(job.id).public_dict()
        copies = sum(job.id in m for m in runtime.redis.lrange(COPY_QUEUE, 0, -1))
        seen[name] = {"answers": answers, "counts": {k: after[k] - before[k] for k in after}, "copies": copies,
                      "job": {k: public[k] for k in ("state", "kling_task_id", "error", "units")},
                      "timeline": _timeline(runtime, job.id),
                      "heard": sorted((k, v.replace(job.id, "<job>"))
                                      for k, v in runtime.redis.hgetall(heard.keys.job_heard(job.id)).items())}
    assert seen["fast"] == seen["view"]
    assert seen["fast"]["counts"] == {"applied": 3, "duplicate": 3, "stale": 2, "early": 0, "refused": 2}
    assert seen["fast"]["copies"] == 1 and seen["fast"]["job"]["state"] == "failed"


def test_a_signed_repeat_still_needs_its_signature(signed_client: FlaskClient, signed_runtime: Runtime) -> None:
    """With KLING_WEBHOOK_SECRET set, a remembered repeat is answered before Flask only when well signed."""
    job_id = _submitted_job(signed_runtime)
    body = json.dumps(_task("t-1", "processing", job_id)).encode()
    assert _post_raw(signed_client, job_id, body, _signed(body)).json["applied"] is True
    calls = _redis_calls(signed_runtime)
    answer = _post_raw(signed_client, job_id, body, _signed(body, msg_id="msg_again"))
    assert answer.status_code == 200 and answer.json["applied"] is False and _redis_calls(signed_runtime) == calls
    forged = _signed(body)
    forged["webhook-signature"] = "v1,bm90LXRoaXMtb25l"
    assert _post_raw(signed_client, job_id, body, forged).status_code == 401


def test_a_first_seen_duplicate_is_answered_before_flask_and_a_step_reads_the_job_once(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that never saw the job reads it once before Flask: a duplicate is answered there; a callback that
    steps the job goes on to the view with that read, which the view does not repeat."""
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "processing", external_task_id=job.id), source="worker",
                detail={})
    assert runtime.store.require(job.id).state is JobState.PROCESSING
    app = create_app(runtime=runtime)
    reached: list[str] = []
    app.before_request(lambda: reached.append(request.path) and None)  # type: ignore[func-returns-value]
    client = app.test_client()
    reads: list[str] = []
    real_read = heard.read_and_remember

    def counted(client_: Any, job_id: str, task: KlingTask, *, ttl_seconds: int) -> Any:
        reads.append(task.status)
        return real_read(client_, job_id, task, ttl_seconds=ttl_seconds)

    monkeypatch.setattr(heard, "read_and_remember", counted)
    before = _callback_counts(client)
    answer = _post(client, job.id, _task("task-1", "submitted", job.id))
    assert answer.status_code == 200 and answer.json == {"ok": True, "applied": False, "state": "processing"}
    assert reached == ["/metrics"] and reads == ["submitted"]  # /metrics: the counts read above
    assert _callback_counts(client)["stale"] - before["stale"] == 1
    reached.clear()
    video = {"task_result": {"videos": [{"id": "v1", "url": "https://cdn.example.com/v1.mp4", "duration": "5"}]}}
    answer = _post(client, job.id, {**_task("task-1", "succeed", job.id), **video})
    assert answer.json["applied"] is True and answer.json["state"] == "generated"
    assert reached == [] and reads == ["submitted", "succeed"]  # the step too, before Flask, on one read


def test_store_down_the_job_is_read_once_then_503(client: FlaskClient, runtime: Runtime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The read before Flask meets the outage; the view answers it (503) without waiting out a second timeout."""
    from tests.support.procs import free_port

    reads: list[str] = []
    real_read = heard.read_and_remember

    def counted(client_: Any, job_id: str, task: KlingTask, *, ttl_seconds: int) -> Any:
        reads.append(job_id)
        return real_read(client_, job_id, task, ttl_seconds=ttl_seconds)

    monkeypatch.setattr(heard, "read_and_remember", counted)
    runtime.store._r.connection_pool.connection_kwargs["port"] = free_port()  # nothing listens there
    runtime.store._r.connection_pool.disconnect()
    answer = _post(client, "job_whatever", _task("t", "processing", "job_whatever"))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5" and reads == ["job_whatever"]


def test_a_failure_in_the_fast_path_leaves_the_callback_to_the_view(client: FlaskClient, runtime: Runtime,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from kling_relay.webhook import callbacks

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the fast path")

    monkeypatch.setattr(callbacks, "_token", broken)
    job, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    answer = _post(client, job.id, _task("task-1", "processing", job.id))
    assert answer.status_code == 200 and answer.json["applied"] is True
    assert runtime.store.require(job.id).state is JobState.PROCESSING


def test_a_step_that_fails_before_flask_is_done_again_by_the_view(client: FlaskClient, runtime: Runtime,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A step the fast path could not finish (a bug of its own) is the view's to do, on the fast path's read: a step
    applied twice is a no-op, so the job steps once and the callback is answered and counted as applied."""
    from kling_relay.shared.logs import bound_fields
    from kling_relay.webhook import callbacks

    real = callbacks.apply_task_status
    calls: list[str] = []
    request_ids: list[str] = []

    def fails_first(*args: Any, **kwargs: Any) -> Any:
        calls.append("step")
        request_ids.append(bound_fields()["request_id"])
        if len(calls) == 1:
            raise RuntimeError("a bug in the fast path's step")
        return real(*args, **kwargs)

    monkeypatch.setattr(callbacks, "apply_task_status", fails_first)
    job_id = _submitted_job(runtime)
    before = _all_counts(client)
    answer = _post(client, job_id, _task("t-1", "processing", job_id))  # no X-Request-ID: one is made
    assert answer.status_code == 200 and answer.json == {"ok": True, "applied": True, "state": "processing"}
    assert calls == ["step", "step"] and _all_counts(client)["applied"] - before["applied"] == 1
    assert [e.to_state for e in runtime.store.events(job_id)][-1] == "processing"
    assert request_ids == [answer.headers["X-Request-ID"]] * 2, "both tries and the answer under one request id"


def test_a_step_made_before_flask_is_answered_as_made_whatever_follows(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the step is made, a failure in what follows it (remembering it, counting it) does not cost its answer:
    the callback is answered "applied" before Flask, not redone by the view as if nothing had happened."""
    from kling_relay.webhook import callbacks

    app = create_app(runtime=runtime)
    reached: list[str] = []
    app.before_request(lambda: reached.append(request.path) and None)  # type: ignore[func-returns-value]
    client = app.test_client()
    real = callbacks.metrics.callback
    failures: list[str] = []

    def count_fails_once(outcome: str) -> None:
        if outcome == "applied" and not failures:
            failures.append(outcome)
            raise RuntimeError("a bug in the counting")
        real(outcome)

    monkeypatch.setattr(callbacks.metrics, "callback", count_fails_once)
    job_id = _submitted_job(runtime)
    answer = _post(client, job_id, _task("t-1", "processing", job_id))
    assert answer.status_code == 200 and answer.json == {"ok": True, "applied": True, "state": "processing"}
    assert failures == ["applied"] and reached == []
    assert [e.to_state for e in runtime.store.events(job_id)].count("processing") == 1


def test_a_step_before_flask_that_meets_a_redis_error_is_a_503_without_a_second_wait(
        client: FlaskClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from kling_relay.webhook import callbacks

    calls: list[str] = []

    def down(*args: Any, **kwargs: Any) -> Any:
        calls.append("step")
        raise redis.exceptions.ConnectionError("Redis went away")

    monkeypatch.setattr(callbacks, "apply_task_status", down)
    job_id = _submitted_job(runtime)
    answer = _post(client, job_id, _task("t-1", "processing", job_id))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5" and calls == ["step"]
    assert runtime.store.require(job_id).state is JobState.SUBMITTED


def test_a_step_before_flask_logs_under_the_request_and_the_job(client: FlaskClient, runtime: Runtime,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What a step logs names the request, the job and its task, as under the view's request hooks."""
    from kling_relay.shared.logs import bound_fields
    from kling_relay.webhook import callbacks

    real = callbacks.apply_task_status
    fields: list[dict[str, Any]] = []

    def seen(*args: Any, **kwargs: Any) -> Any:
        fields.append(bound_fields())
        return real(*args, **kwargs)

    monkeypatch.setattr(callbacks, "apply_task_status", seen)
    job_id = _submitted_job(runtime)
    answer = _post(client, job_id, _task("t-1", "processing", job_id), headers={"X-Request-ID": "req-7"})
    assert answer.json["applied"] is True and answer.headers["X-Request-ID"] == "req-7"
    assert fields == [{"request_id": "req-7", "job_id": job_id, "kling_task_id": "t-1"}]
    assert bound_fields() == {}
