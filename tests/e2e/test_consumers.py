"""The consumers' contract against the whole running stack (issue 8, item 8): manifests the pipeline writes match
docs/manifest.schema.json, the events stream has one entry per terminal transition (canceled included) with its
ISO-8601 time, and a job that asks for intermediate states (`notify_events`) gets each one POSTed, signed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from jsonschema import Draft202012Validator

from deploy.stack import BUCKET, DEMO_NOTIFY_SECRET, LocalStack
from kling_relay.shared.client import Relay
from kling_relay.shared.notify import verify
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.support.receiver import Receiver, serve_receiver
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json").read_text())
STREAM = "kling-relay:events"


def stream_entries(stack: LocalStack, job_id: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    try:
        return [fields for _, fields in client.xrange(STREAM) if fields["job_id"] == job_id]
    finally:
        client.close()


def entered(job: dict[str, Any], state: str) -> str:
    """The ISO time of the job's (last) step into `state`, from its timeline."""
    at: str = [e["at"] for e in job["events"] if e["to"] == state and e["from"] != state][-1]
    return at


def test_manifests_the_pipeline_writes_match_the_schema(clean_sim: LocalStack) -> None:
    """Issue 8.8: the manifest had no schema_version and no schema; both jobs' real manifests must validate, and
    the schema must be strict enough to refuse a manifest without its version or with an unknown key."""
    Draft202012Validator.check_schema(SCHEMA)
    validator = Draft202012Validator(SCHEMA)
    ids = [submit(clean_sim, job_body(81, metadata={"order": 81, "tags": ["a", "b"]}, negative_prompt="blur",
                                      mode="pro")),
           submit(clean_sim, job_body(82))]
    jobs = wait_jobs(clean_sim, ids)
    s3 = clean_sim.s3()
    for job_id in ids:
        job = jobs[job_id]
        assert job["state"] == "stored", job
        key = job["videos"][0]["key"].rsplit("/", 1)[0] + "/manifest.json"
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert [e.message for e in validator.iter_errors(manifest)] == [], manifest
        assert manifest["schema_version"] == 1 and manifest["videos"] == job["videos"]
        assert manifest["metadata"] == job["metadata"]
        assert not validator.is_valid({k: v for k, v in manifest.items() if k != "schema_version"})
        assert not validator.is_valid({**manifest, "surprise": True})
        assert not validator.is_valid({**manifest, "videos": [{**manifest["videos"][0], "sha256": "xyz"}]})


def test_stored_and_canceled_jobs_each_get_one_stream_entry_with_its_iso_time(clean_sim: LocalStack) -> None:
    """Issue 8.8: a canceled job (over HTTP or the Python client) got no stream entry, and entries carried no
    time of the transition."""
    stored_id = submit(clean_sim, job_body(83))
    # Kling fixes a task's schedule at its create: once this job's task exists, the slow schedule below is not its
    # (a create that reached the simulator after the knob kept the job in flight for 30 s)
    wait_until(lambda: clean_sim.api("GET", f"/v1/jobs/{stored_id}").json()["kling_task_id"], timeout=60,
               what="the first job's task created at Kling", diagnostics=clean_sim.logs_tail)
    clean_sim.sim_control(submitted_seconds=30)  # the next jobs stay in flight until canceled
    try:
        http_id = submit(clean_sim, job_body(84))
        python_id = submit(clean_sim, job_body(85))
        assert clean_sim.api("POST", f"/v1/jobs/{http_id}/cancel").status_code == 200
        with Relay.from_env(clean_sim.env) as relay:
            relay.cancel(python_id, reason="from the backend")
    finally:
        clean_sim.sim_control(submitted_seconds=0.2)
    jobs = wait_jobs(clean_sim, [stored_id, http_id, python_id])
    for job_id, state in ((stored_id, "stored"), (http_id, "canceled"), (python_id, "canceled")):
        assert jobs[job_id]["state"] == state
        [entry] = stream_entries(clean_sim, job_id)
        assert entry["state"] == state and entry["at"] == entered(jobs[job_id], state)
        payload = json.loads(entry["payload"])
        assert payload["type"] == f"job.{state}" and payload["timestamp"] == entry["at"]
        assert payload["data"]["id"] == job_id and payload["data"]["state"] == state


@pytest.fixture()
def hook() -> Iterator[tuple[str, type[Receiver]]]:
    with serve_receiver("/hooks/relay") as served:
        yield served


def test_a_job_asking_for_intermediate_states_gets_each_one_signed(clean_sim: LocalStack,
                                                                     hook: tuple[str, type[Receiver]]) -> None:
    """Issue 8.8: only the finished job was ever POSTed; with notify_events ["processing", "generated",
    "stored"] the receiver gets three signed notifications, one per state, each with its own webhook-id and the
    time the job entered that state; the states it did not ask for (submitted) are not sent."""
    url, handler = hook
    job_id = submit(clean_sim, job_body(86, notify_url=url, notify_events=["processing", "generated", "stored"]))
    job = wait_jobs(clean_sim, [job_id])[job_id]
    assert job["state"] == "stored" and job["notify_events"] == ["processing", "generated", "stored"]
    wait_until(lambda: len(handler.seen) >= 3, timeout=60, what="three notifications",
               diagnostics=clean_sim.logs_tail)
    time.sleep(0.5)  # deliberate pause, asserted across: nothing else is coming
    by_state = {}
    for headers, body in list(handler.seen):
        assert verify(DEMO_NOTIFY_SECRET, headers, body)
        payload = json.loads(body)
        state = payload["type"].removeprefix("job.")
        assert headers["webhook-id"] == f"msg_{job_id}_{state}"
        assert payload["data"]["id"] == job_id
        by_state[state] = payload
    assert sorted(by_state) == ["generated", "processing", "stored"] and len(handler.seen) == 3
    for state, payload in by_state.items():
        assert payload["timestamp"] == entered(job, state)
    assert by_state["stored"]["data"]["videos"] == job["videos"]
