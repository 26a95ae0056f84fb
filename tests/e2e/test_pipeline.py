"""The product end to end, every part real: HTTP API → Celery submit → simulator → callback → copy → S3."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import redis
import requests

from deploy.stack import LocalStack
from kling_relay.shared.tokens import callback_token
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


def _objects(stack: LocalStack, job: dict[str, Any]) -> list[str]:
    prefix = job["videos"][0]["key"].rsplit("/", 1)[0] + "/"
    listing = stack.s3().list_objects_v2(Bucket=job["videos"][0]["bucket"], Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in listing.get("Contents", []))


def _manifest(stack: LocalStack, job: dict[str, Any]) -> dict[str, Any]:
    key = job["videos"][0]["key"].rsplit("/", 1)[0] + "/manifest.json"
    body = stack.s3().get_object(Bucket=job["videos"][0]["bucket"], Key=key)["Body"].read()
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def _served_sha256(stats: dict[str, Any], task_id: str) -> str:
    entries = stats["videos"][task_id]
    assert len(entries) == 1, entries
    sha: str = entries[0]["sha256"]
    return sha


def test_twenty_jobs_reach_stored_byte_identical(clean_sim: LocalStack) -> None:
    stack = clean_sim
    ids = [submit(stack, job_body(n)) for n in range(20)]
    jobs = wait_jobs(stack, ids, timeout=180)
    stats = stack.sim_stats()
    assert {job_id: len(stats["tasks_by_external_id"].get(job_id, [])) for job_id in ids} == dict.fromkeys(ids, 1)
    s3 = stack.s3()
    for job_id, job in jobs.items():
        assert job["state"] == "stored", job
        assert len(job["videos"]) == 1
        video = job["videos"][0]
        data = s3.get_object(Bucket=video["bucket"], Key=video["key"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == video["sha256"] == _served_sha256(stats, job["kling_task_id"])
        assert len(data) == video["bytes"] and data[4:8] == b"ftyp"
        manifest = _manifest(stack, job)
        assert manifest["job_id"] == job_id and manifest["kling_task_id"] == job["kling_task_id"]
        assert manifest["videos"][0]["sha256"] == video["sha256"]
        assert _objects(stack, job) == ["manifest.json", "video.mp4"]
        head = s3.head_object(Bucket=video["bucket"], Key=video["key"])
        assert head["ContentType"] == "video/mp4"
        assert head["Metadata"].get("job-id") == job_id
        states = [e["to"] for e in job["events"] if e["to"] != e["from"]]
        assert states == ["queued", "submitted", "processing", "generated", "stored"] or (
            states[0] == "queued" and states[-2:] == ["generated", "stored"]), states


def test_access_log_never_shows_a_callback_token(clean_sim: LocalStack) -> None:
    stack = clean_sim
    job_id = submit(stack, job_body(31))
    assert wait_jobs(stack, [job_id])[job_id]["state"] == "stored"
    log = stack.processes["web"].log_path.read_text(errors="replace")
    assert f"/callbacks/kling/{job_id}" in log
    assert "token=" not in log and callback_token_for(job_id) not in log


def test_duplicate_and_reordered_callbacks_leave_one_copy(clean_sim: LocalStack) -> None:
    stack = clean_sim
    stack.sim_control(callback_duplicate=3, callback_reorder=True)
    try:
        ids = [submit(stack, job_body(100 + n)) for n in range(5)]
        jobs = wait_jobs(stack, ids)
    finally:
        stack.sim_control(callback_duplicate=1, callback_reorder=False)
    stats = stack.sim_stats()
    assert {job_id: len(stats["tasks_by_external_id"].get(job_id, [])) for job_id in ids} == dict.fromkeys(ids, 1)
    for job in jobs.values():
        assert job["state"] == "stored"
        assert _objects(stack, job) == ["manifest.json", "video.mp4"]
        assert [e["to"] for e in job["events"]].count("stored") == 1
        assert [e["to"] for e in job["events"]].count("generated") == 1


def test_kling_failed_task_ends_failed_with_its_message(clean_sim: LocalStack) -> None:
    stack = clean_sim
    stack.sim_control(fail_every_n=1, fail_message="content too dull")
    try:
        job_id = submit(stack, job_body(7))
        job = wait_jobs(stack, [job_id])[job_id]
    finally:
        stack.sim_control(fail_every_n=0)
    assert job["state"] == "failed"
    assert job["error"]["reason"] == "kling_failed"
    assert job["error"]["message"] == "content too dull"
    assert job["videos"] == []


def test_forged_callbacks_are_refused_and_change_nothing(clean_sim: LocalStack) -> None:
    stack = clean_sim
    stack.sim_control(submitted_seconds=5)  # keep the job in "submitted" while we forge
    try:
        job_id = submit(stack, job_body(8))
        wait_until(lambda: stack.api("GET", f"/v1/jobs/{job_id}").json()["kling_task_id"], timeout=10,
                   what="the job's Kling task", diagnostics=stack.logs_tail, interval=0.1)
        before = stack.api("GET", f"/v1/jobs/{job_id}").json()
        assert before["state"] == "submitted"
        task = {"task_id": before["kling_task_id"], "task_status": "succeed", "task_status_msg": "",
                "task_info": {"external_task_id": job_id}, "created_at": 1, "updated_at": 2,
                "task_result": {"videos": [{"id": "v", "url": "http://127.0.0.1:1/evil.mp4", "duration": "5"}]}}
        url = f"{stack.web_url}/callbacks/kling/{job_id}"
        assert requests.post(url, json=task, params={"token": "0" * 64}, timeout=10).status_code == 403
        assert requests.post(url, json=task, timeout=10).status_code == 403
        token = callback_token_for(job_id)
        other = {**task, "task_id": "someone-elses-task"}
        assert requests.post(url, json=other, params={"token": token}, timeout=10).status_code == 409
        assert requests.post(url, data=b"not json", params={"token": token}, timeout=10).status_code == 400
        assert requests.post(url, json={"task_id": 5}, params={"token": token}, timeout=10).status_code == 400
        big = {**task, "task_status_msg": "x" * 300_000}
        assert requests.post(url, json=big, params={"token": token}, timeout=10).status_code == 413
        ghost = "job_doesnotexist"
        assert requests.post(f"{stack.web_url}/callbacks/kling/{ghost}", json=task,
                             params={"token": callback_token_for(ghost)}, timeout=10).status_code == 404
        after = stack.api("GET", f"/v1/jobs/{job_id}").json()
        assert after["state"] == "submitted" and after["events"] == before["events"]
    finally:
        stack.sim_control(submitted_seconds=0.2)
    assert wait_jobs(stack, [job_id])[job_id]["state"] == "stored"


def callback_token_for(job_id: str) -> str:
    from deploy.stack import DEMO_CALLBACK_SECRET
    from kling_relay.shared.settings import Secret

    return callback_token(Secret(DEMO_CALLBACK_SECRET), job_id)


def test_finished_job_is_published_to_the_stream(clean_sim: LocalStack) -> None:
    stack = clean_sim
    job_id = submit(stack, job_body(9, metadata={"order": 42}))
    wait_jobs(stack, [job_id])
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    entries = [fields for _, fields in client.xrange("kling-relay:events") if fields["job_id"] == job_id]
    assert len(entries) == 1
    payload = json.loads(entries[0]["payload"])
    assert payload["type"] == "job.stored" and payload["data"]["metadata"] == {"order": 42}
    assert client.get(f"kr:job:{job_id}:request") is None  # a stored job's request is in its manifest only
    recorded = _manifest(stack, stack.api("GET", f"/v1/jobs/{job_id}").json())["request"]
    assert "image_list" not in recorded and recorded["images"] == ["<base64>", "<base64>"]
    assert recorded["prompt"] == "test job 9"


def in_state(stack: LocalStack, job_id: str, state: str) -> dict[str, Any] | None:
    job: dict[str, Any] = stack.api("GET", f"/v1/jobs/{job_id}").json()
    return job if job["state"] == state else None


def copy_ended(stack: LocalStack, job_id: str) -> bool:
    """A worker logged that the job's copy gave up after the cancel (the copy's last step for it)."""
    ends = ("copy dropped", "copy withdrawn")
    return any(job_id in line and any(end in line for end in ends)
               for name, proc in stack.processes.items() if name.startswith("worker")
               for line in proc.log_path.read_text(errors="replace").splitlines())


def test_a_job_canceled_during_its_copy_leaves_nothing_in_s3(clean_sim: LocalStack) -> None:
    stack = clean_sim
    stack.sim_control(download_rate=2_000)  # the copy of a small video takes a few seconds
    try:
        job_id = submit(stack, job_body(41))
        generated = wait_until(lambda: in_state(stack, job_id, "generated"), timeout=60, what="the job generated",
                               diagnostics=stack.logs_tail, interval=0.1)
        task_id = generated["kling_task_id"]
        wait_until(lambda: stack.sim_stats()["downloads"].get(task_id, {}).get("started", 0) >= 1, timeout=60,
                   what="the copy downloading", diagnostics=stack.logs_tail)
        assert stack.api("POST", f"/v1/jobs/{job_id}/cancel").status_code == 200
        wait_until(lambda: stack.sim_stats()["downloads"][task_id]["completed"] >= 1, timeout=60,
                   what="the download finished", diagnostics=stack.logs_tail, interval=0.2)
        wait_until(lambda: copy_ended(stack, job_id), timeout=30, what="the copy task to give the job up",
                   diagnostics=stack.logs_tail, interval=0.2)
    finally:
        stack.sim_control(download_rate=0)
    job = stack.api("GET", f"/v1/jobs/{job_id}").json()
    assert job["state"] == "canceled" and job["videos"] == []
    listing = stack.s3().list_objects_v2(Bucket="kling-relay-demo")
    assert [o["Key"] for o in listing.get("Contents", []) if job_id in o["Key"]] == []
    uploads = stack.s3().list_multipart_uploads(Bucket="kling-relay-demo").get("Uploads", [])
    assert [u["Key"] for u in uploads if job_id in u["Key"]] == []
