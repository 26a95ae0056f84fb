"""A wrong setting never costs a video (issue 9.1 and 9.9), for real: the whole stack (gunicorn, a Celery worker,
beat, Redis, moto, the simulator), settings changed the way an operator changes them (env + worker restart).

- A result URL on a host that VIDEO_URL_ALLOWLIST refuses: the job waits in `generated` with the reason, nothing is
  written to S3; after the list is widened and the worker restarted, it is `stored`.
- No bucket: jobs wait in `generated`, `/v1/status` says why, resuming without a fix pauses again; once the bucket
  exists the reconciler's probe resumes copying and they are `stored`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from deploy.stack import BUCKET, DEMO_API_TOKEN, LocalStack
from kling_relay.shared.http_client import RelayClient
from kling_relay.shared.jobs import JobStore
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import assert_stored_once, fault_stack, get_job, get_jobs, wait_until

pytestmark = pytest.mark.e2e

DEFAULT_ALLOWLIST = "*.klingai.com,*.kwimgs.com,*.inkwai.com"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    env = {"KLING_PAUSE_PROBE_SECONDS": "1"}
    with fault_stack(tmp_path_factory.mktemp("faults-copy-settings"), env=env) as started:
        yield started


def use_allowlist(stack: LocalStack, value: str) -> None:
    """Set VIDEO_URL_ALLOWLIST for the workers (restarting them only when it changes)."""
    if stack.env["VIDEO_URL_ALLOWLIST"] != value:
        stack.restart_workers({"VIDEO_URL_ALLOWLIST": value})


def status(stack: LocalStack) -> dict[str, Any]:
    response = stack.api("GET", "/v1/status")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def copy_attempts(stack: LocalStack, job_id: str) -> int:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        return JobStore(client).require(job_id).attempts.get("copy", 0)
    finally:
        client.close()


def objects_of(stack: LocalStack, job_id: str) -> list[str]:
    listing = stack.s3().list_objects_v2(Bucket=BUCKET)
    return [o["Key"] for o in listing.get("Contents", []) if f"/{job_id}/" in o["Key"]]


def test_a_result_url_off_the_allowlist_waits_then_is_stored_once_the_list_is_widened(stack: LocalStack) -> None:
    stack.sim_reset()
    use_allowlist(stack, DEFAULT_ALLOWLIST)  # the simulator's 127.0.0.1 is not on it
    job_id = submit(stack, job_body(3000))

    def waits_on_the_host() -> dict[str, Any] | None:
        job = get_job(stack, job_id)
        notes = [e["detail"] for e in job["events"] if e["detail"].get("waiting") == "video_host_refused"]
        return job if notes and notes[0]["host"] == "127.0.0.1" else None

    job = wait_until(waits_on_the_host, timeout=60, what="the copy waiting on the refused host", stack=stack)
    assert job["state"] == "generated" and job["error"] is None
    waiting = status(stack)["copy_waiting"]
    assert [(w["job_id"], w["reason"], w["host"]) for w in waiting["jobs"]] == [
        (job_id, "video_host_refused", "127.0.0.1")]
    # the reconciler re-queues the copy (every KLING_PAUSE_PROBE_SECONDS): it checks again and still waits
    wait_until(lambda: copy_attempts(stack, job_id) >= 3, timeout=60, what="the copy re-checked", stack=stack)
    assert get_job(stack, job_id)["state"] == "generated"
    assert objects_of(stack, job_id) == []
    assert stack.sim_stats()["downloads"] == {}
    log = stack.processes["worker1"].log_path.read_text(errors="replace")
    assert "copy waits: video URL host refused by VIDEO_URL_ALLOWLIST" in log

    use_allowlist(stack, f"http://127.0.0.1:{stack.sim_port}")  # the operator widens the list and restarts
    jobs = wait_jobs(stack, [job_id], timeout=90)
    assert_stored_once(stack, jobs)
    assert status(stack)["copy_waiting"] == {"count": 0, "jobs": []}


def test_no_bucket_pauses_copying_until_the_bucket_exists(stack: LocalStack) -> None:
    stack.sim_reset()
    use_allowlist(stack, f"http://127.0.0.1:{stack.sim_port}")
    s3 = stack.s3()
    versions = s3.list_object_versions(Bucket=BUCKET)
    for item in versions.get("Versions", []) + versions.get("DeleteMarkers", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"], VersionId=item["VersionId"])
    s3.delete_bucket(Bucket=BUCKET)
    try:
        ids = [submit(stack, job_body(3100 + n)) for n in range(2)]

        def paused_with_all_generated() -> dict[str, Any] | None:
            current = status(stack)
            states = {j["state"] for j in get_jobs(stack, ids).values()}
            return current if current["copy"] == "paused" and states == {"generated"} else None

        paused = wait_until(paused_with_all_generated, timeout=60, what="copying paused, the jobs generated",
                            stack=stack)
        assert paused["copy_pause"]["reason"] == "storage" and paused["copy_pause"]["code"] == "NoSuchBucket"
        assert stack.api("GET", "/healthz").json()["copy"] == "paused"

        with RelayClient(stack.web_url, token=DEMO_API_TOKEN) as client:  # resuming without a fix ...
            resumed = client.resume_copy()
        assert resumed["resumed"] is True and resumed["pause"]["code"] == "NoSuchBucket"
        again = wait_until(lambda: status(stack)["copy_pause"], timeout=60, what="copying paused again",
                           stack=stack)
        assert again["code"] == "NoSuchBucket"  # ... pauses again at the next copy or probe; no job failed
        assert {j["state"] for j in get_jobs(stack, ids).values()} == {"generated"}
    finally:
        s3.create_bucket(Bucket=BUCKET)  # the operator creates it: the probe resumes copying
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    jobs = wait_jobs(stack, ids, timeout=90)
    assert_stored_once(stack, jobs)
    assert status(stack)["copy"] == "open"
