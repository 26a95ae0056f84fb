"""Fault knobs on the API side: rate limit, concurrency cap, server errors, forced account errors,
ambiguous creates, generation failures, unusable images, and the seeded RNG."""

from __future__ import annotations

import json
import uuid
from http.client import HTTPConnection, RemoteDisconnected

import pytest
import requests

from tests.simulator.conftest import CREATE_PATH, create, create_body, png_base64, wait_task
from tests.support.procs import free_port
from tests.support.sim import SimHandle


def code_of(r: requests.Response) -> tuple[int, int]:
    return r.status_code, r.json()["code"]


def test_every_nth_create_is_rate_limited(sim: SimHandle, http: requests.Session) -> None:
    sim.control(rate_limit_every_n=3)
    answers = [code_of(create(sim, http)) for _ in range(6)]
    assert answers == [(200, 0), (200, 0), (429, 1302), (200, 0), (200, 0), (429, 1302)]
    stats = sim.stats()
    assert stats["tasks_created"] == 4
    assert stats["error_codes"] == {"1302": 2}


def test_the_first_n_creates_are_rate_limited_then_none(sim: SimHandle, http: requests.Session) -> None:
    sim.control(rate_limit_first_n=2)
    answers = [code_of(create(sim, http)) for _ in range(4)]
    assert answers == [(429, 1302), (429, 1302), (200, 0), (200, 0)]
    sim.control(rate_limit_first_n=1)  # setting the knob again counts from zero
    assert [code_of(create(sim, http)) for _ in range(2)] == [(429, 1302), (200, 0)]
    assert sim.stats()["error_codes"] == {"1302": 3}


def test_queries_are_not_rate_limited(sim: SimHandle, http: requests.Session) -> None:
    sim.control(rate_limit_every_n=1)
    r = http.get(sim.base_url + CREATE_PATH, headers=sim.auth_header(), timeout=10)
    assert code_of(r) == (200, 0)


def test_in_flight_cap_is_1303(sim: SimHandle, http: requests.Session) -> None:
    sim.control(max_in_flight=2, submitted_seconds=60)
    assert code_of(create(sim, http)) == (200, 0)
    assert code_of(create(sim, http)) == (200, 0)
    assert code_of(create(sim, http)) == (429, 1303)
    assert sim.stats()["in_flight"] == 2


def test_in_flight_cap_frees_up_when_tasks_finish(sim: SimHandle, http: requests.Session) -> None:
    sim.control(max_in_flight=1, video_bytes=1000)
    first = create(sim, http).json()["data"]["task_id"]
    assert code_of(create(sim, http)) == (429, 1303)
    wait_task(sim, first)
    assert code_of(create(sim, http)) == (200, 0)


@pytest.mark.parametrize(("code", "status"), [(5000, 500), (5001, 503), (5002, 504)])
def test_server_errors_on_create(sim: SimHandle, http: requests.Session, code: int, status: int) -> None:
    sim.control(server_error_every_n=2, server_error_code=code)
    assert code_of(create(sim, http)) == (200, 0)
    assert code_of(create(sim, http)) == (status, code)
    assert sim.stats()["tasks_created"] == 1


def test_server_errors_on_queries_only(sim: SimHandle, http: requests.Session) -> None:
    task_id = create(sim, http).json()["data"]["task_id"]
    sim.control(server_error_every_n=1, server_error_on="query")
    r = http.get(f"{sim.base_url}{CREATE_PATH}/{task_id}", headers=sim.auth_header(), timeout=10)
    assert code_of(r) == (500, 5000)
    assert code_of(create(sim, http)) == (200, 0)


def test_server_error_after_the_task_was_created(sim: SimHandle, http: requests.Session) -> None:
    sim.control(server_error_every_n=1, server_error_creates_task=True, server_error_code=5002)
    assert code_of(create(sim, http, external_task_id="gw-timeout")) == (504, 5002)
    sim.control(server_error_every_n=0)
    assert sim.task("gw-timeout")["task_info"]["external_task_id"] == "gw-timeout"


def test_forced_account_error_until_cleared(sim: SimHandle, http: requests.Session) -> None:
    sim.control(force_error_code=1101)
    assert code_of(create(sim, http)) == (429, 1101)
    assert code_of(http.get(sim.base_url + CREATE_PATH, headers=sim.auth_header(), timeout=10)) == (200, 0)
    sim.control(force_error_code=1102, force_error_on="all")
    assert code_of(http.get(sim.base_url + CREATE_PATH, headers=sim.auth_header(), timeout=10)) == (429, 1102)
    sim.control(force_error_code=0)
    assert code_of(create(sim, http)) == (200, 0)


def test_ambiguous_create_drop_still_creates_the_task(sim: SimHandle, http: requests.Session) -> None:
    sim.control(ambiguous_create_every_n=1, ambiguous_create_mode="drop")
    conn = HTTPConnection("127.0.0.1", sim.port, timeout=10)
    body = json.dumps(create_body(external_task_id="lost-answer"))
    conn.request("POST", CREATE_PATH, body=body, headers={**sim.auth_header(),
                                                          "Content-Type": "application/json"})
    with pytest.raises((RemoteDisconnected, ConnectionResetError)):
        conn.getresponse()
    conn.close()
    task = sim.task("lost-answer")
    assert task["task_status"] in ("submitted", "processing", "succeed")
    assert sim.stats()["tasks_by_external_id"] == {"lost-answer": [task["task_id"]]}


def test_ambiguous_create_delay_answers_too_late(sim: SimHandle, http: requests.Session) -> None:
    sim.control(ambiguous_create_every_n=2, ambiguous_create_mode="delay", ambiguous_create_delay=30)
    assert code_of(create(sim, http)) == (200, 0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.post(sim.base_url + CREATE_PATH, json=create_body(external_task_id="slow-answer"),
                  headers=sim.auth_header(), timeout=1.0)
    # the simulator keeps serving others while that answer hangs, and the task exists
    assert sim.task("slow-answer")["task_info"]["external_task_id"] == "slow-answer"


def test_generation_failure_knob(sim: SimHandle, http: requests.Session) -> None:
    sim.control(fail_every_n=2, fail_message="risk control: try another picture")
    first = create(sim, http).json()["data"]["task_id"]
    second = create(sim, http).json()["data"]["task_id"]
    assert wait_task(sim, first)["task_status"] == "succeed"
    failed = wait_task(sim, second)
    assert failed["task_status"] == "failed"
    assert failed["task_status_msg"] == "risk control: try another picture"
    assert "task_result" not in failed


def test_unreachable_image_url_fails_the_task(sim: SimHandle, http: requests.Session) -> None:
    url = f"http://127.0.0.1:{free_port()}/missing.png"
    task_id = create(sim, http, image_list=[{"image": url}]).json()["data"]["task_id"]
    task = wait_task(sim, task_id)
    assert task["task_status"] == "failed"
    assert "could not be downloaded" in task["task_status_msg"]


@pytest.mark.parametrize(("image", "words"), [
    ("bm90IGFuIGltYWdl", "could not be decoded"),
    ("%%% not base64 %%%", "valid base64"),
    (png_base64(200, 200), "at least 300"),
    (png_base64(1000, 300), "aspect ratio"),
    (png_base64(400, 400, fmt="GIF"), "not supported"),
])
def test_unusable_image_fails_the_task(sim: SimHandle, http: requests.Session, image: str, words: str) -> None:
    task_id = create(sim, http, image_list=[{"image": image}]).json()["data"]["task_id"]
    task = wait_task(sim, task_id)
    assert task["task_status"] == "failed"
    assert words in task["task_status_msg"]


def test_probabilities_are_reproducible_with_the_seed(sim: SimHandle, http: requests.Session) -> None:
    def pattern() -> list[int]:
        sim.reset()
        sim.control(seed=7, rate_limit_probability=0.5)
        return [create(sim, http, external_task_id=str(uuid.uuid4())).json()["code"] for _ in range(12)]

    first = pattern()
    assert first == pattern()
    assert set(first) == {0, 1302}


def test_bad_knobs_are_refused(sim: SimHandle) -> None:
    for bad in ({"no_such_knob": 1}, {"rate_limit_probability": 2}, {"server_error_code": 5003},
                {"callback_duplicate": 0}, {"callback_reorder": "yes"}, {"force_error_code": 42}):
        with pytest.raises(ValueError):
            sim.control(**bad)
    assert sim.control()["rate_limit_probability"] == 0.0


def test_reset_restores_startup_knobs(sim: SimHandle, http: requests.Session) -> None:
    sim.control(force_error_code=1101)
    sim.reset(keep_knobs=True)
    assert code_of(create(sim, http)) == (429, 1101)
    sim.reset()
    assert code_of(create(sim, http)) == (200, 0)
    assert sim.stats()["tasks_created"] == 1
