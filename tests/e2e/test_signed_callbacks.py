"""Signed callbacks end to end (issue 9 item 7): the simulator signs as Kling does once a webhook secret exists in
its console (Standard Webhooks), the relay, given the same secret as KLING_WEBHOOK_SECRET, checks every callback.

Each test starts its own stack (the secrets are fixed at start-up): with the same secret on both sides the job is
stored through its callbacks; with another secret in the simulator every callback is refused (401) and the
reconciler, polling Kling, still brings the job home. The matching stack also has a model in KLING_MODELS that the
simulator does not have: Kling's 1203 at its create ends that job at once (issue 9 item 3).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import fault_stack

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(b"kling-console-secret-0123456789").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-console-secret-98765").decode()
CREATE = "POST /v1/videos/multi-image2video"


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def callback_answers(stack: LocalStack, task_id: str) -> list[Any]:
    return [entry.get("http_status") for entry in stack.sim_stats()["callbacks"].get(task_id, [])]


def sources(job: dict[str, Any]) -> set[str]:
    return {e["source"] for e in job["events"] if e["from"] != e["to"]}


@pytest.fixture()
def signed_stack(workdir: Path) -> Iterator[LocalStack]:
    with fault_stack(workdir, sim_args=["--webhook-secret", SECRET],
                     env={"KLING_WEBHOOK_SECRET": SECRET, "KLING_MODELS": "kling-v1-6,kling-v9-unknown",
                          "RECONCILE_QUIET_SECONDS": "600"}) as stack:
        yield stack


def test_signed_callbacks_are_verified_and_applied(signed_stack: LocalStack) -> None:
    """The reconciler waits ten minutes here: only accepted callbacks can move the job to stored in time."""
    stack = signed_stack
    job_id = submit(stack, job_body(1))
    job = wait_jobs(stack, [job_id], timeout=60)[job_id]
    assert job["state"] == "stored", job
    assert "callback" in sources(job) and "reconciler" not in sources(job)
    answers = callback_answers(stack, job["kling_task_id"])
    assert answers and set(answers) <= {200, 202}  # 202: a callback before the worker recorded the task

    rejected = submit(stack, job_body(2, model_name="kling-v9-unknown"))
    failed = wait_jobs(stack, [rejected], timeout=60)[rejected]
    assert failed["state"] == "failed" and failed["error"]["reason"] == "kling_rejected:1203", failed
    assert stack.sim_stats()["requests"][CREATE] == 2  # one create each: 1203 is not retried


def test_callbacks_signed_with_another_secret_are_refused(workdir: Path) -> None:
    with fault_stack(workdir, sim_args=["--webhook-secret", OTHER_SECRET, "--callback-retries", "0"],
                     env={"KLING_WEBHOOK_SECRET": SECRET}) as stack:
        job_id = submit(stack, job_body(3))
        job = wait_jobs(stack, [job_id], timeout=90)[job_id]
        assert job["state"] == "stored", job
        assert "callback" not in sources(job) and "reconciler" in sources(job)
        answers = callback_answers(stack, job["kling_task_id"])
        assert answers and set(answers) == {401}
        assert "callback refused: missing, wrong or stale webhook signature" in stack.processes["web"].log_tail(400)
