"""Redis (broker and job store, AOF on with fsync on every write) is stopped (SIGTERM) or killed (SIGKILL) and
started again on the same port and data directory while jobs are in flight. No job is lost, not even one
accepted just before the restart, and every job ends stored, with one Kling task, one video and one manifest.

The web process, the worker and beat must reconnect on their own. The test checks that separately from the
data: while it waits it revives any process that exited (as a process manager would), so a crash cannot hide a
lost job, and at the end a process that had to be revived fails the test with its log. This caught a worker
crash: kombu 5.7's Redis transport, when the broker connection is lost with messages unacknowledged and the
loss is seen on the worker's remote-control (pub/sub) connection, raises AttributeError ('NoneType' object has
no attribute 'hostname') from Channel.close -> restore_unacked and the worker exits ("Unrecoverable error");
shared/queue.py now turns remote control off (`worker_enable_remote_control=False`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from deploy.stack import LocalStack
from tests.e2e.conftest import TERMINAL, job_body, submit
from tests.e2e.faults_conftest import assert_stored_once, fault_stack, get_jobs, needs_reconciler, wait_until

pytestmark = [pytest.mark.e2e, needs_reconciler]

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with fault_stack(tmp_path_factory.mktemp("faults-redis"), redis_appendonly=True,
                     env={"JOB_LOCK_SECONDS": "3"}) as s:
        yield s


def server_info(stack: LocalStack) -> dict[str, str]:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=5)
    try:
        info = client.info("server")
        appendonly = client.config_get("appendonly")["appendonly"]
    finally:
        client.close()
    return {"run_id": str(info["run_id"]), "appendonly": appendonly}


def wait_jobs_reviving(stack: LocalStack, ids: list[str], timeout: float) -> tuple[dict[str, dict[str, Any]],
                                                                                   dict[str, str]]:
    """Wait until every job is terminal, reviving exited processes; returns the jobs and {revived: log tail}."""
    revived: dict[str, str] = {}

    def finished() -> dict[str, dict[str, Any]] | None:
        for name in [n for n, p in stack.processes.items() if not p.alive()]:
            revived[name] = stack.processes[name].log_tail(200)
        stack.revive()
        jobs = get_jobs(stack, ids)
        return jobs if all(j["state"] in TERMINAL for j in jobs.values()) else None

    return wait_until(finished, timeout=timeout, what="all jobs finished", stack=stack, interval=0.3), revived


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_redis_restart_mid_run_loses_no_job(stack: LocalStack, crash: bool) -> None:
    stack.sim_reset()
    stack.revive()  # an earlier parametrization may have left a crashed process behind
    # tasks stay 'processing' for 2 s and downloads take 2 s, so work is in flight everywhere at the restart
    stack.sim_control(processing_seconds=2, video_bytes=200_000, download_rate=100_000)
    base = 4000 + 1000 * crash
    ids = [submit(stack, job_body(base + n)) for n in range(6)]
    wait_until(lambda: all(j["kling_task_id"] for j in get_jobs(stack, ids).values()), timeout=60,
               what="all jobs submitted to Kling", stack=stack)
    ids += [submit(stack, job_body(base + 10 + n)) for n in range(2)]  # accepted just before the restart
    before = server_info(stack)
    assert before["appendonly"] == "yes"

    stack.restart_redis(down_seconds=1.0, crash=crash)

    assert server_info(stack)["run_id"] != before["run_id"]  # really a new redis-server process
    # the web process reconnects by itself: the first submit after the restart is accepted
    late = [submit(stack, job_body(base + 100 + n)) for n in range(3)]
    jobs, revived = wait_jobs_reviving(stack, ids + late, timeout=180)

    # the data: nothing lost, everything stored exactly once
    assert_stored_once(stack, jobs)
    listed = stack.api("GET", "/v1/jobs", params={"limit": 200}).json()["jobs"]
    assert set(ids + late) <= {j["id"] for j in listed}

    # the processes: each should have reconnected by itself
    assert not revived, "processes exited and had to be restarted:\n" + "\n".join(
        f"--- {name} ---\n{tail}" for name, tail in revived.items())
