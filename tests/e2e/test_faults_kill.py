"""A worker is SIGKILLed (its whole process group: the Celery parent and its prefork children) in the middle of
a copy and in the middle of a submit, then started again. Its unacknowledged messages would come back only
after the broker's visibility timeout (two hours), so the rescue is the reconciler's: it re-queues the due
jobs once their per-job locks (JOB_LOCK_SECONDS, 3 s here) have lapsed. Every job ends stored, with no
second Kling task, no truncated or duplicate object, and no multipart upload left open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import assert_stored_once, fault_stack, get_jobs, needs_reconciler, wait_until

pytestmark = [pytest.mark.e2e, needs_reconciler]


@pytest.fixture(scope="module")
def kill_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with fault_stack(tmp_path_factory.mktemp("faults-kill"), env={"JOB_LOCK_SECONDS": "3"}) as stack:
        yield stack


@pytest.fixture()
def stack(kill_stack: LocalStack) -> Iterator[LocalStack]:
    kill_stack.sim_reset()
    yield kill_stack
    if "worker1" not in kill_stack.processes:  # a failed test must not leave the next one without a worker
        kill_stack.restart("worker1")


VIDEO_BYTES = 12 * 1024 * 1024


def open_upload_jobs(stack: LocalStack, ids: list[str]) -> set[str]:
    """The jobs (of ids) that have a multipart upload open in the bucket."""
    keys = [u["Key"] for u in stack.multipart_uploads()]
    return {job_id for job_id in ids if any(f"/{job_id}/" in key for key in keys)}


def test_worker_killed_mid_copy(stack: LocalStack) -> None:
    # 12 MiB served at 1 MB/s: each copy opens its multipart upload once it has read a part (8 MiB, after about
    # eight seconds; a shorter video goes up in one PutObject at the end) and spends four more seconds inside its
    # download with the upload open
    stack.sim_control(video_bytes=VIDEO_BYTES, download_rate=1_000_000)
    ids = [submit(stack, job_body(3000 + n)) for n in range(3)]

    def all_copying() -> dict[str, dict[str, Any]] | None:
        jobs = get_jobs(stack, ids)
        if all(j["state"] == "generated" for j in jobs.values()) and open_upload_jobs(stack, ids) == set(ids):
            return jobs
        return None

    wait_until(all_copying, timeout=60, what="three copies in flight", stack=stack)
    stack.kill("worker1")
    assert {j["state"] for j in get_jobs(stack, ids).values()} == {"generated"}
    assert open_upload_jobs(stack, ids) == set(ids)  # the dead copies left their uploads open
    downloads = stack.sim_stats()["downloads"]
    assert all(d["completed"] == 0 for d in downloads.values()), downloads  # killed mid-download

    stack.sim_control(download_rate=0)
    stack.restart("worker1")
    jobs = wait_jobs(stack, ids, timeout=120)
    # one version of video.mp4: the killed uploads were never completed; none is left open either
    assert_stored_once(stack, jobs, video_versions=1)
    for job in jobs.values():
        assert job["videos"][0]["bytes"] == VIDEO_BYTES


def test_worker_killed_mid_submit(stack: LocalStack) -> None:
    # Creates make their task and then hold the answer for a minute: the worker sits inside the create call.
    # Callbacks are dropped too, so nothing but the reconciler can move these jobs on.
    stack.sim_control(ambiguous_create_every_n=1, ambiguous_create_mode="delay", ambiguous_create_delay=60,
                      callback_drop_every_n=1)
    ids = [submit(stack, job_body(3100 + n)) for n in range(3)]

    def all_created() -> bool:
        return set(ids) <= set(stack.sim_stats()["tasks_by_external_id"])

    wait_until(all_created, timeout=60, what="Kling tasks made for all jobs", stack=stack)
    before = get_jobs(stack, ids)
    assert {(j["state"], j["kling_task_id"]) for j in before.values()} == {("queued", None)}
    stack.kill("worker1")

    stack.sim_control(ambiguous_create_every_n=0)
    stack.restart("worker1")
    jobs = wait_jobs(stack, ids, timeout=120)
    assert_stored_once(stack, jobs)  # one Kling task each: the one made before the kill
    for job in jobs.values():
        assert any(e["detail"].get("found_by") == "external_task_id" for e in job["events"]), job["events"]
