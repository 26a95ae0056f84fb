"""Logs that tie together: one job is followed across processes with `grep` on its id. Every line about it carries
`job_id` (and `kling_task_id` once known), and the `X-Request-ID` of the `POST /v1/jobs` that made it is in the
web process's access line, in the job's first event and on the worker's lines for its submit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.stack import LocalStack
from kling_relay.shared.queue import COPY_TASK, SUBMIT_TASK
from tests.e2e.conftest import job_body, wait_jobs
from tests.support.json_logs import records

pytestmark = pytest.mark.e2e


def grep(stack: LocalStack, name: str, text: str) -> list[dict[str, Any]]:
    """The records of a process's log whose line contains `text` (as `grep text <log>` finds them)."""
    lines = stack.processes[name].log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if text in line]


def test_one_job_is_followed_across_processes_by_its_ids(clean_sim: LocalStack) -> None:
    stack = clean_sim
    stack.sim_control(rate_limit_first_n=1)  # the first create is throttled: the submit is retried
    request_id = "req-log-correlation-0001"
    response = stack.api("POST", "/v1/jobs", json=job_body(7), headers={"X-Request-ID": request_id})
    assert response.status_code == 202, response.text
    assert response.headers["X-Request-ID"] == request_id
    job_id = response.json()["id"]
    job = wait_jobs(stack, [job_id])[job_id]
    assert job["state"] == "stored", job
    task_id = job["kling_task_id"]
    assert task_id

    # the first event of the timeline names the request that made the job
    first = job["events"][0]
    assert first["to"] == "queued" and first["detail"].get("request_id") == request_id, job["events"]

    # web: the access line of the POST carries the request id; the app's line about the job both ids
    access = [r for r in records(stack.processes["web"].log_path)
              if r.get("msg") == "request" and r.get("request_id") == request_id]
    assert [(r["method"], r["path"], r["status"], r.get("job_id")) for r in access] == [
        ("POST", "/v1/jobs", 202, job_id)], access
    web = grep(stack, "web", job_id)  # the POST's lines, the GETs that polled the job, Kling's callbacks
    assert all(r.get("job_id") == job_id for r in web), [r for r in web if r.get("job_id") != job_id]
    assert any(r.get("msg") == "job accepted" and r.get("request_id") == request_id for r in web), web
    assert any(r.get("path", "").startswith(f"/callbacks/kling/{job_id}") for r in web), web

    # worker: every line that names the job carries it as job_id; the submit's lines carry the request id,
    # the lines written once the Kling task is known carry its id
    worker = grep(stack, "worker1", job_id)
    assert worker and all(r.get("job_id") == job_id for r in worker), [r for r in worker if "job_id" not in r]
    done = {r["task"]: r for r in worker if r.get("msg") == "task done"}
    assert set(done) >= {SUBMIT_TASK, COPY_TASK}, worker
    assert done[SUBMIT_TASK]["request_id"] == request_id
    retried = [r for r in worker if r.get("msg") == "retrying later"]
    assert retried and all(r.get("request_id") == request_id for r in retried), retried  # and after the retry:
    assert done[SUBMIT_TASK]["outcome"] == "submitted"
    assert done[COPY_TASK]["kling_task_id"] == task_id
    received = [r for r in worker if r.get("logger") == "celery.worker.strategy"]
    assert {r["data"]["name"] for r in received} >= {SUBMIT_TASK, COPY_TASK}, received
    stored = [r for r in worker if r.get("msg") == "stored"]
    assert stored and stored[0]["kling_task_id"] == task_id, stored
    # and grep on the request id finds the web's lines and the worker's submit, nothing of another job
    for name in ("web", "worker1"):
        assert all(r.get("job_id") in (None, job_id) for r in grep(stack, name, request_id))
    assert grep(stack, "worker1", request_id)
