"""Fuzz the whole HTTP API from its own OpenAPI description (schemathesis), against the real gunicorn process.

Every operation of `/openapi.json` gets schema-valid and schema-violating requests with a valid bearer token; every
response must be a non-5xx whose status, content type, headers and body are the ones the description declares.
The callback operation is called with a job id and token that are valid, so that fuzzed bodies reach the Kling
task parser and the state steps instead of stopping at the 403.

The stack here is redis-server and gunicorn only, with no Celery worker: jobs the fuzzer manages to create stay
queued, so none reaches the simulator (which would fetch the fuzzer's image URLs) and no other test's counters
move. Bounded: at most MAX_EXAMPLES requests per operation and generation mode.

Schemathesis never generates lone UTF-16 surrogates (they cannot be encoded as UTF-8), yet a JSON body can carry one
as a `\\ud800` escape. So each case may get one (`taint`): appended to one string of its JSON body, a value or an
object key at any depth; that body goes out as raw JSON bytes with the surrogate escaped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import redis
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deploy.stack import DEMO_API_TOKEN, DEMO_CALLBACK_SECRET, LocalStack
from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.settings import Secret, load_settings
from kling_relay.shared.tokens import callback_token
from kling_relay.webhook.openapi import openapi_document
from tests.shared.test_ops import REQUEST, failed_job

pytestmark = pytest.mark.e2e
MAX_EXAMPLES = 100
STACK_ENV = {"MAX_REQUEST_BYTES": "200000"}
AUTH = {"Authorization": f"Bearer {DEMO_API_TOKEN}"}
LONE_SURROGATES = ("\ud800", "\udfff", "\udcff")  # \udcff: how Python keeps a byte that is not UTF-8
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(Path(tmp_path_factory.mktemp("fuzz-stack")), env=STACK_ENV)
    try:
        s.redis.start()
        s.start_web()
        s.wait_ready()
    except BaseException:
        s.stop()
        raise
    yield s
    s.stop()


@pytest.fixture(scope="module")
def seeded(fuzz_stack: LocalStack) -> Iterator[dict[str, str]]:
    """One job per interesting state: the fuzzer's ids are random, these are the ones it can act on."""
    client = redis.Redis.from_url(fuzz_stack.redis.url, decode_responses=True)
    store = JobStore(client)
    queued, _ = store.create(dict(REQUEST))
    stored, _ = store.create(dict(REQUEST))
    store.step(stored.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "task-stored"})
    store.step(stored.id, JobState.STORED, source="worker", set_fields={"videos": [
        {"bucket": "b", "key": "k/video.mp4", "sha256": "00" * 32, "bytes": 1, "duration": "5"}]})
    ids = {"queued": queued.id, "stored": stored.id,
           "failed": failed_job(store, "copy_exhausted", task_id="task-failed", via=[JobState.GENERATED])}
    yield ids
    client.close()


@pytest.fixture(scope="module")
def fresh_job(fuzz_stack: LocalStack) -> Iterator[Callable[[str], str]]:
    """A new job for one example ("fresh-queued", "fresh-failed" a retry can resume): the seeded ones take an ops
    action once, so only these let a late example's body (e.g. a reason with a lone surrogate) reach the store."""
    client = redis.Redis.from_url(fuzz_stack.redis.url, decode_responses=True)
    store = JobStore(client)

    def make(kind: str) -> str:
        if kind == "fresh-failed":
            return failed_job(store, "submit_exhausted")
        return store.create(dict(REQUEST))[0].id

    yield make
    client.close()


def _document() -> dict[str, Any]:
    """The description the fuzz stack's web process serves (the same settings); checked by the last test."""
    env = {**LocalStack(Path("/nonexistent"), env=STACK_ENV).env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    return openapi_document(load_settings(env))


# Loaded at import, so that pytest collects one test per operation (schemathesis' fixture-based loader does not
# work with this pytest); the requests go to the fuzz stack's address, given per call.
schema = schemathesis.openapi.from_dict(_document())


def with_lone_surrogate(value: Any, slot: int, lone: str) -> Any:
    """`value` (a JSON body) with `lone` appended to its string number `slot` (modulo how many it has; object keys
    and values, depth first, in order); unchanged when it has no string."""
    count = [0]

    def walk(item: Any, target: int) -> Any:
        if isinstance(item, str):
            count[0] += 1
            return item + lone if count[0] - 1 == target else item
        if isinstance(item, list):
            return [walk(inner, target) for inner in item]
        if isinstance(item, dict):
            return {walk(key, target): walk(inner, target) for key, inner in item.items()}
        return item

    walk(value, -1)
    if count[0] == 0:
        return value
    total, count[0] = count[0], 0
    return walk(value, slot % total)


@schema.parametrize()
@schema.given(pick=st.sampled_from([None, "queued", "stored", "failed", "fresh-queued", "fresh-failed"]),
              taint=st.none() | st.tuples(st.integers(0, 63), st.sampled_from(LONE_SURROGATES)))
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_request_gets_a_server_error_and_every_answer_is_as_described(
        case: Any, pick: str | None, taint: tuple[int, str] | None, seeded: dict[str, str],
        fresh_job: Callable[[str], str], fuzz_stack: LocalStack) -> None:
    if pick is not None and pick.startswith("fresh-"):
        seeded = {**seeded, pick: fresh_job(pick)}
    if taint is not None and isinstance(case.body, dict | list | str):
        # raw JSON bytes (the surrogate as its ASCII escape): schemathesis' own validator cannot read such a string
        case.body = json.dumps(with_lone_surrogate(case.body, *taint)).encode("ascii")
    if "job_id" in (case.path_parameters or {}) and pick is not None:
        case.path_parameters["job_id"] = seeded[pick]
    if case.operation.path == "/callbacks/kling/{job_id}":
        job_id = seeded[pick or "queued"]
        case.path_parameters["job_id"] = job_id
        case.query = {**(case.query or {}), "token": callback_token(Secret(DEMO_CALLBACK_SECRET), job_id)}
    case.call_and_validate(base_url=fuzz_stack.web_url, headers=AUTH, checks=CHECKS, timeout=30)


def test_the_stored_job_kept_its_history(fuzz_stack: LocalStack, seeded: dict[str, str]) -> None:
    """Whatever the fuzzer sent (cancel, retry, forged callbacks with a valid token), a stored job is final."""
    client = redis.Redis.from_url(fuzz_stack.redis.url, decode_responses=True)
    try:
        store = JobStore(client)
        job = store.require(seeded["stored"])
        moves = [(e.from_state, e.to_state) for e in store.events(job.id) if e.from_state != e.to_state]
    finally:
        client.close()
    assert job.state is JobState.STORED and job.kling_task_id == "task-stored" and len(job.videos) == 1
    assert moves == [(None, "queued"), ("queued", "submitted"), ("submitted", "stored")]


def test_the_fuzzed_description_is_the_one_served(fuzz_stack: LocalStack) -> None:
    import requests

    served = requests.get(fuzz_stack.web_url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == _document()
