"""A reseller, end to end with real processes (issue 9 item 8): the simulator behind a `/kling` prefix with a static
Bearer key, once with Kling's read routes and once serving only the create (`no_query`, which `KLING_QUERY=auto`
finds out by itself and answers with callbacks-only mode). Every job is stored with exactly one Kling task, also
with callbacks duplicated and reordered; a create whose answer is lost is never sent again without read routes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.stack import LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.faults_conftest import (
    assert_callbacks_tripled_and_reordered,
    assert_stored_once,
    fault_stack,
    get_jobs,
    wait_until,
)
from tests.support.json_logs import records

pytestmark = pytest.mark.e2e

API_KEY = "reseller-static-key-0123456789"
SECRET = "whsec_" + base64.b64encode(b"kling-console-secret-0123456789").decode()
CREATE = "POST /v1/videos/multi-image2video"
GET_ONE = "GET /v1/videos/multi-image2video/{id}"
LIST = "GET /v1/videos/multi-image2video"


@pytest.fixture(scope="module")
def reseller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with fault_stack(tmp_path_factory.mktemp("reseller"), sim_prefix="/kling", sim_api_key=API_KEY,
                     sim_args=["--video-bytes", "40000"]) as stack:
        yield stack


@pytest.fixture()
def stack(reseller: LocalStack) -> Iterator[LocalStack]:
    """The module's stack with the simulator reset and the `auto` verdict forgotten (the next need probes again)."""
    reseller.sim_reset()
    client = redis.Redis.from_url(reseller.redis.url, decode_responses=True)
    client.delete("kr:kling:reads")
    yield reseller
    client.close()


def submit_jobs(stack: LocalStack, count: int, first: int) -> list[str]:
    return [submit(stack, job_body(first + n)) for n in range(count)]


def test_a_reseller_with_read_routes(stack: LocalStack) -> None:
    ids = submit_jobs(stack, 4, 3000)
    jobs = wait_jobs(stack, ids, timeout=90)
    assert_stored_once(stack, jobs)
    assert stack.sim_stats()["requests"].get(GET_ONE, 0) >= len(ids), "the copy read each task back"


def test_a_reseller_without_read_routes_callbacks_duplicated_and_reordered(stack: LocalStack) -> None:
    stack.sim_control(no_query=True, callback_duplicate=3, callback_reorder=True)
    ids = submit_jobs(stack, 4, 3100)
    jobs = wait_jobs(stack, ids, timeout=90)
    assert_stored_once(stack, jobs)
    stats = stack.sim_stats()
    for job in jobs.values():
        assert_callbacks_tripled_and_reordered(stats, job)
        moved_by = {e["to"]: e["source"] for e in job["events"] if e["from"] != e["to"]}
        assert moved_by["generated"] == "callback", job["events"]
    # The read routes were only probed (KLING_QUERY=auto: a get-by-id, then a list), never read: a copy or a poll
    # would add get-by-ids beyond the probes. Jobs copied at once probe at once, and the relay's own shared rate
    # limit may refuse a probe's list before it is sent (that probe then rests on its get-by-id's "missing").
    probes = [r for log in sorted(stack.logs.glob("*.log")) for r in records(log)
              if str(r.get("msg", "")).startswith("kling read routes") and r.get("job_id") in ids]
    requests = stats["requests"]
    assert probes and requests.get(GET_ONE, 0) == len(probes), (requests, probes)
    assert 1 <= requests.get(LIST, 0) <= len(probes), (requests, probes)


def test_without_read_routes_a_lost_create_answer_is_never_sent_again(stack: LocalStack) -> None:
    stack.sim_control(no_query=True, ambiguous_create_every_n=2, ambiguous_create_mode="drop")
    ids = submit_jobs(stack, 4, 3200)

    def settled() -> dict[str, dict[str, Any]] | None:
        status = stack.api("GET", "/v1/status").json()
        jobs = get_jobs(stack, ids)
        stored = [j for j in jobs.values() if j["state"] == "stored"]
        return jobs if len(stored) == 2 and len(status["awaiting_callback"]) == 2 else None

    jobs = wait_until(settled, timeout=90, what="two jobs stored and two awaiting their callback", stack=stack,
                      interval=0.5)
    waiting = [j for j in jobs.values() if j["state"] != "stored"]
    assert [j["state"] for j in waiting] == ["queued", "queued"]
    stats = stack.sim_stats()
    assert stats["requests"][CREATE] == 4, "every job was created once, none again"
    assert all(len(stats["tasks_by_external_id"][job_id]) == 1 for job_id in ids)  # the lost answers' tasks exist
    assert stats["duplicate_creates"] == {}
    for job in waiting:
        notes = [e["detail"] for e in job["events"] if e["from"] == e["to"] and e["detail"].get("waiting")]
        assert notes and "create outcome unknown" in notes[0]["why"], job["events"]
    assert_stored_once(stack, {j["id"]: j for j in jobs.values() if j["state"] == "stored"})


def test_without_read_routes_a_signed_callback_binds_the_task_of_a_lost_create_answer(tmp_path: Path) -> None:
    """With Kling's signature on callbacks (KLING_WEBHOOK_SECRET), a callback is Kling's own word: the job whose
    create answer was lost gets its task from it, and is stored, with one task and one create."""
    with fault_stack(tmp_path, sim_prefix="/kling", sim_api_key=API_KEY,
                     sim_args=["--video-bytes", "40000", "--no-query", "--webhook-secret", SECRET,
                               "--ambiguous-create-every-n", "1"],
                     env={"KLING_WEBHOOK_SECRET": SECRET}) as stack:
        job_id = submit(stack, job_body(3300))
        jobs = wait_jobs(stack, [job_id], timeout=90)
        job = jobs[job_id]
        bound = [e for e in job["events"] if e["from"] != e["to"] and e["to"] == "submitted"]
        assert bound and bound[0]["source"] == "callback" and bound[0]["detail"]["bound_by"] == "signed callback"
        assert_stored_once(stack, jobs)
        assert stack.sim_stats()["requests"][CREATE] == 1
        assert stack.api("GET", "/v1/status").json()["awaiting_callback"] == []
