"""Ops actions end to end, every part real: cancel a job in flight at the simulator, retry jobs whose copy or submit
was exhausted by injected faults until they are stored, over HTTP, the Python client and the CLI.

The module runs its own LocalStack with small attempt budgets (2 submits, 2 copies, short back-off) so that
exhaustion takes a second instead of a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.stack import LocalStack
from kling_relay.shared.client import Relay
from kling_relay.shared.jobs import JobState
from kling_relay.shared.ops import ActionRefused
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = {"submitted_seconds": 0.2, "processing_seconds": 0.3}


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("ops-stack"), sim_args=["--submitted-seconds", "0.2"],
                   env={"SUBMIT_MAX_ATTEMPTS": "2", "COPY_MAX_ATTEMPTS": "2", "RETRY_BASE_SECONDS": "0.2",
                        "RETRY_MAX_SECONDS": "0.5", "MAX_REQUEST_BYTES": "2000000"})
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def stack(ops_stack: LocalStack) -> LocalStack:
    ops_stack.sim_reset()
    ops_stack.sim_control(**FAST)
    return ops_stack


def job(stack: LocalStack, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = stack.api("GET", f"/v1/jobs/{job_id}").json()
    return result


def keys_of(stack: LocalStack, job_id: str) -> list[str]:
    listing = stack.s3().list_objects_v2(Bucket="kling-relay-demo")
    return [o["Key"] for o in listing.get("Contents", []) if job_id in o["Key"]]


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "jobs", *args], env=stack.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def stream_entries(stack: LocalStack, job_id: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    try:
        return [fields for _, fields in client.xrange("kling-relay:events") if fields["job_id"] == job_id]
    finally:
        client.close()


def in_submitted(stack: LocalStack, job_id: str) -> dict[str, Any] | None:
    current = job(stack, job_id)
    return current if current["state"] == "submitted" and current["kling_task_id"] else None


def test_cancel_in_flight_then_kling_finishes_and_nothing_changes(stack: LocalStack) -> None:
    stack.sim_control(submitted_seconds=1.5)
    job_id = submit(stack, job_body(1))
    task_id = wait_until(lambda: in_submitted(stack, job_id), timeout=60, what="job submitted at Kling",
                         diagnostics=stack.logs_tail)["kling_task_id"]

    response = stack.api("POST", f"/v1/jobs/{job_id}/cancel", json={"reason": "no longer needed"})
    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["state"] == "canceled"
    last = canceled["events"][-1]
    assert (last["from"], last["to"], last["source"]) == ("submitted", "canceled", "api")
    assert last["detail"]["reason"] == "no longer needed" and last["detail"]["kling_task_id"] == task_id

    def final_callback_delivered() -> bool:
        sent = stack.sim_stats()["callbacks"].get(task_id, [])
        return any(c["status"] == "succeed" and c.get("http_status") == 200 for c in sent)

    wait_until(final_callback_delivered, timeout=60, what="Kling's succeed callback delivered",
               diagnostics=stack.logs_tail)
    after = job(stack, job_id)
    assert after["state"] == "canceled" and after["events"] == canceled["events"] and after["videos"] == []
    assert keys_of(stack, job_id) == []
    assert stack.sim_stats()["tasks_by_external_id"][job_id] == [task_id]
    again = stack.api("POST", f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["state"] == "canceled"
    assert stack.api("POST", f"/v1/jobs/{job_id}/retry").status_code == 409


def test_retry_after_copy_exhausted_ends_stored(stack: LocalStack) -> None:
    """Copy exhausted, retried over HTTP, stored. The events stream has the job twice, `failed` then `stored`, each
    at its transition's time (issue 8.8: entries carried no time of the transition)."""
    stack.sim_control(download_truncate_bytes=100)
    job_id = submit(stack, job_body(2))
    failed = wait_jobs(stack, [job_id], timeout=60)[job_id]
    assert failed["state"] == "failed" and failed["error"]["reason"] == "copy_exhausted", failed
    stack.sim_control(download_truncate_bytes=None)

    response = stack.api("POST", f"/v1/jobs/{job_id}/retry", json={"reason": "downloads fixed"})
    assert response.status_code == 200, response.text
    assert response.json()["state"] in ("generated", "stored")
    stored = wait_jobs(stack, [job_id])[job_id]
    assert stored["state"] == "stored" and stored["error"] is None
    assert stored["kling_task_id"] == failed["kling_task_id"]
    assert sorted(k.rsplit("/", 1)[1] for k in keys_of(stack, job_id)) == ["manifest.json", "video.mp4"]
    assert stack.sim_stats()["tasks_by_external_id"][job_id] == [failed["kling_task_id"]]
    moves = [(e["from"], e["to"], e["source"]) for e in stored["events"] if e["from"] != e["to"]]
    assert moves[-4:] == [("generated", "failed", "worker"), ("failed", "queued", "api"),
                          ("queued", "generated", "api"), ("generated", "stored", "worker")]
    times = {e["to"]: e["at"] for e in stored["events"] if e["from"] != e["to"]}
    entries = [(e["state"], e["at"], json.loads(e["payload"])["type"]) for e in stream_entries(stack, job_id)]
    assert entries == [("failed", times["failed"], "job.failed"), ("stored", times["stored"], "job.stored")]


def test_retry_after_submit_exhausted_adopts_the_task_the_lost_create_made(stack: LocalStack) -> None:
    """Every create answers 5000 but makes its task, every lookup answers 5000, callbacks are lost: the submit is
    exhausted while Kling has the job's task. The CLI's retry must find that task, not create a second one."""
    stack.sim_control(server_error_on="all", server_error_every_n=1, server_error_creates_task=True,
                      callback_drop_every_n=1)
    job_id = submit(stack, job_body(3))
    failed = wait_jobs(stack, [job_id], timeout=60)[job_id]
    assert failed["state"] == "failed" and failed["error"]["reason"] == "submit_exhausted", failed
    made = stack.sim_stats()["tasks_by_external_id"][job_id]
    assert len(made) == 1 and failed["kling_task_id"] is None
    stack.sim_control(server_error_every_n=0, callback_drop_every_n=0)

    done = cli(stack, "retry", job_id, "--reason", "Kling is back")
    assert done.returncode == 0, done.stderr
    assert '"state": "queued"' in done.stdout
    stored = wait_jobs(stack, [job_id])[job_id]
    assert stored["state"] == "stored" and stored["kling_task_id"] == made[0]
    stats = stack.sim_stats()
    assert stats["tasks_by_external_id"][job_id] == made and job_id not in stats["duplicate_creates"]
    retry_notes = [e for e in stored["events"] if e["detail"].get("action") == "retry"]
    assert retry_notes and retry_notes[0]["detail"]["via"].startswith("cli:")
    assert retry_notes[0]["detail"]["reason"] == "Kling is back"


def test_python_client_cancels_and_is_refused_with_reasons(stack: LocalStack) -> None:
    stack.sim_control(submitted_seconds=1.5)
    job_id = submit(stack, job_body(4))
    wait_until(lambda: in_submitted(stack, job_id), timeout=60, what="job submitted at Kling",
               diagnostics=stack.logs_tail)
    with Relay.from_env(stack.env) as relay:
        canceled = relay.cancel(job_id, reason="from the backend")
        assert canceled.state is JobState.CANCELED
        with pytest.raises(ActionRefused, match="already canceled"):
            relay.cancel(job_id)
        with pytest.raises(ActionRefused, match="only a failed job"):
            relay.retry(job_id)
        listed, _ = relay.list(state="canceled", limit=200)
        assert job_id in [j.id for j in listed]
    event = job(stack, job_id)["events"][-1]
    assert event["detail"]["via"] == "python" and event["detail"]["reason"] == "from the backend"


def test_kling_failed_retry_is_409_and_makes_no_task(stack: LocalStack) -> None:
    stack.sim_control(fail_every_n=1, fail_message="nope")
    job_id = submit(stack, job_body(5))
    failed = wait_jobs(stack, [job_id])[job_id]
    assert failed["error"]["reason"] == "kling_failed"
    stack.sim_control(fail_every_n=0)
    response = stack.api("POST", f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 409 and "new job" in response.json()["error"]
    refused = cli(stack, "retry", job_id)
    assert refused.returncode == 4 and "new job" in refused.stderr
    # deliberate pause, asserted across: give a wrongly queued submit the time to reach the simulator
    time.sleep(0.5)
    assert stack.sim_stats()["tasks_by_external_id"][job_id] == [failed["kling_task_id"]]
    assert job(stack, job_id) == failed


def test_http_not_found_and_auth(stack: LocalStack) -> None:
    for action in ("retry", "cancel"):
        assert stack.api("POST", f"/v1/jobs/job_unknown/{action}").status_code == 404
        response = stack.api("POST", f"/v1/jobs/job_unknown/{action}", token="wrong-token-0123456789")
        assert response.status_code == 401


def test_cli_get_list_and_exit_codes(stack: LocalStack) -> None:
    job_id = submit(stack, job_body(6))
    wait_jobs(stack, [job_id])
    got = cli(stack, "get", job_id)
    assert got.returncode == 0 and f'"id": "{job_id}"' in got.stdout and '"events"' in got.stdout
    listed = cli(stack, "list", "--state", "stored", "--limit", "200")
    assert listed.returncode == 0 and job_id in listed.stdout and '"next_cursor"' in listed.stdout
    assert cli(stack, "get", "job_unknown").returncode == 3
    refused = cli(stack, "cancel", job_id)
    assert refused.returncode == 4 and "already stored" in refused.stderr
    assert cli(stack, "list", "--limit", "0").returncode == 2
    assert cli(stack, "list", "--cursor", "garbage!").returncode == 2
    env = {**stack.env, "REDIS_URL": "http://nope"}  # settings are checked: a bad REDIS_URL is named
    bad = subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "jobs", "get", job_id], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "REDIS_URL" in bad.stderr
