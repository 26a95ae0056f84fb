"""The Python client and the signed notification, against the whole running stack."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from deploy.stack import DEMO_NOTIFY_SECRET, LocalStack
from kling_relay.shared.client import Relay
from kling_relay.shared.jobs import JobState
from kling_relay.shared.notify import verify
from kling_relay.shared.settings import Secret
from kling_relay.shared.validation import ValidationFailed
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.support.receiver import Receiver, serve_receiver
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture()
def hook() -> Iterator[tuple[str, type[Receiver]]]:
    with serve_receiver("/hooks/kling", status=200, fail_first=1) as served:
        yield served


def test_notify_url_gets_one_signed_event_after_a_retry(clean_sim: LocalStack,
                                                         hook: tuple[str, type[Receiver]]) -> None:
    url, handler = hook
    job_id = submit(clean_sim, job_body(21, notify_url=url, metadata={"order": 7}))
    job = wait_jobs(clean_sim, [job_id])[job_id]
    assert job["state"] == "stored"
    wait_until(lambda: len(handler.seen) >= 2, timeout=30, what="the second delivery after the 503",
               diagnostics=clean_sim.logs_tail, interval=0.2)
    assert len(handler.seen) == 2, "first delivery answered 503, the second must follow"
    (h1, b1), (h2, b2) = handler.seen
    assert h1["webhook-id"] == h2["webhook-id"]
    assert verify(Secret(DEMO_NOTIFY_SECRET), h2, b2)
    payload = json.loads(b2)
    assert payload["type"] == "job.stored"
    assert payload["data"]["id"] == job_id and payload["data"]["metadata"] == {"order": 7}
    assert payload["data"]["videos"][0]["sha256"] == job["videos"][0]["sha256"]
    time.sleep(1)  # deliberate pause, asserted across
    assert len(handler.seen) == 2  # delivered once it succeeded: no more


def test_python_client_submit_wait_get(clean_sim: LocalStack) -> None:
    relay = Relay.from_env(clean_sim.env)
    seen: list[str] = []
    job = relay.submit(idempotency_key="client-1", **job_body(22))
    again = relay.submit(idempotency_key="client-1", **job_body(22))
    assert again.id == job.id
    done = relay.wait(job.id, timeout=60, poll=0.2, on_change=lambda j: seen.append(j.state.value))
    assert done.state is JobState.STORED and done.videos[0]["bytes"] > 0
    assert seen[-1] == "stored"
    got = relay.get(job.id)
    assert got is not None and got.state is JobState.STORED
    assert relay.get("job_unknown") is None


def test_python_client_refuses_bad_input_and_stores_nothing(clean_sim: LocalStack) -> None:
    relay = Relay.from_env(clean_sim.env)
    before = relay.store.counts()
    with pytest.raises(ValidationFailed) as info:
        relay.submit(image_list=[], prompt="", duration=7)
    assert [p.field for p in info.value.problems] == ["image_list", "prompt", "duration"]
    assert relay.store.counts() == before
