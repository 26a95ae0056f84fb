"""Flower works unchanged: `celery -A kling_relay.worker.celery_app flower` (the Procfile's `flower` process)
against the relay's Redis shows the workers and every task with its name, its arguments (the job id, never a
secret) and its state. Task events are on (shared/queue.py); remote control stays off, so Flower's workers page
comes from the workers' event heartbeats (`/workers?json=1`), not from `inspect` (`/api/workers` stays empty).
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import requests

from deploy.stack import DEMO_API_TOKEN, DEMO_CALLBACK_SECRET, DEMO_NOTIFY_SECRET, DEMO_SECRET_KEY, LocalStack
from kling_relay.shared.queue import COPY_TASK, SUBMIT_TASK
from tests.e2e.conftest import job_body, submit, wait_jobs

pytestmark = pytest.mark.e2e

AUTH = ("ops", "flower-test-password")
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, stack: LocalStack) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout}s\n{stack.logs_tail()}")


def flower_get(stack: LocalStack, path: str) -> Any:
    response = requests.get(stack.flower_url + path, auth=AUTH, timeout=10)
    response.raise_for_status()
    return response.json()


def pubsub_state(stack: LocalStack) -> dict[str, Any]:
    """What Redis says about event subscribers, and whether a heartbeat is published within 6 s."""
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=10)
    try:
        state: dict[str, Any] = {"numpat": client.pubsub_numpat(), "channels": client.pubsub_channels(),
                                 "clients": [c.get("name") or c.get("cmd") for c in client.client_list()]}
        sub = client.pubsub()
        sub.psubscribe("*celeryev*")
        deadline = time.monotonic() + 6
        seen = []
        while time.monotonic() < deadline:
            message = sub.get_message(timeout=1)
            if message and message["type"] == "pmessage":
                seen.append(message["channel"])
        state["published"] = seen
        sub.close()
        return state
    finally:
        client.close()


def live_workers(stack: LocalStack) -> list[dict[str, Any]] | None:
    workers = [w for w in flower_get(stack, "/workers?json=1")["data"] if w.get("status")]
    return workers or None


@pytest.fixture()
def flower(stack: LocalStack) -> Iterator[LocalStack]:
    """Flower started and receiving events: the worker's heartbeats (every 2 s) have reached it.

    In 2 of about 10 runs here, Flower 2.2's event receiver (kombu 5.7, Redis) logged "Connected" but never
    subscribed (Redis showed no pattern subscriber while the worker's heartbeats were published), so Flower showed
    nothing for 60 s. Not understood yet; the workaround, here and in the README, is to restart Flower.
    """
    for attempt in range(3):
        stack.start_flower(basic_auth=":".join(AUTH))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and live_workers(stack) is None:
            time.sleep(0.3)
        if live_workers(stack) is not None:
            break
        print("flower received no event; restarting it", attempt, pubsub_state(stack))
        stack.kill("flower")
    else:
        pytest.fail(f"Flower never received the worker's heartbeats\n{stack.logs_tail()}")
    try:
        yield stack
    finally:
        # SIGKILL: Flower 2.2 answers SIGTERM with sys.exit(0) and then hangs joining its event thread (10 s, then
        # Process.stop kills it anyway); it keeps nothing that a kill could lose.
        stack.kill("flower")


def test_flower_shows_the_workers_and_every_task_with_its_job_id_and_state(flower: LocalStack) -> None:
    stack = flower

    # the worker's heartbeats reach Flower (see the fixture): it sees the tasks sent from now on
    workers = live_workers(stack)
    assert workers is not None
    assert any(str(w["hostname"]).startswith("worker1@") for w in workers), workers
    assert requests.get(stack.flower_url + "/api/tasks", timeout=10).status_code == 401  # behind its basic auth

    ids = [submit(stack, job_body(n)) for n in range(2)]
    jobs = wait_jobs(stack, ids)
    assert {j["state"] for j in jobs.values()} == {"stored"}, jobs

    def tasks_done() -> dict[tuple[str, str], dict[str, Any]] | None:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for task in flower_get(stack, "/api/tasks").values():
            args = ast.literal_eval(task.get("args") or "()")
            if task["name"] in (SUBMIT_TASK, COPY_TASK) and list(args)[:1] and args[0] in ids:
                if task["state"] == "SUCCESS":
                    found[(task["name"], args[0])] = task
        wanted = {(name, job_id) for name in (SUBMIT_TASK, COPY_TASK) for job_id in ids}
        return found if wanted <= set(found) else None

    tasks = wait_for(tasks_done, timeout=60, what="the jobs' submit and copy tasks succeeded in Flower", stack=stack)
    for (_, job_id), task in tasks.items():
        assert ast.literal_eval(task["args"]) == [job_id], task  # the job id and nothing else
        assert task["worker"].startswith("worker1@"), task
    # remote control is off (shared/queue.py): `inspect` gets no answer, so the API's worker list, which asks the
    # workers, stays empty; the workers page above comes from their heartbeats
    assert flower_get(stack, "/api/workers") == {}
    everything = str(flower_get(stack, "/api/tasks"))
    for secret in (DEMO_API_TOKEN, DEMO_CALLBACK_SECRET, DEMO_NOTIFY_SECRET, DEMO_SECRET_KEY):
        assert secret not in everything
