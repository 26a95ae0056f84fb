"""Callback delivery and its fault knobs: retries, drop, duplicate, reorder, delay."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import requests

from tests.simulator.conftest import FAST, CallbackListener, create, wait_task
from tests.support.procs import free_port
from tests.support.sim import SimHandle, running_simulator


def attempts(stats: dict[str, Any], task_id: str) -> list[dict[str, Any]]:
    return list(stats["callbacks"].get(task_id, []))


def start(sim: SimHandle, http: requests.Session, listener: CallbackListener) -> str:
    r = create(sim, http, callback_url=listener.url)
    assert r.status_code == 200
    return str(r.json()["data"]["task_id"])


def test_each_status_change_is_posted_in_order(sim: SimHandle, http: requests.Session,
                                              listener: CallbackListener) -> None:
    task_id = start(sim, http, listener)
    received = listener.wait_count(3)
    assert [r.body["task_status"] for r in received] == ["submitted", "processing", "succeed"]
    assert received[-1].body == sim.task(task_id)
    assert all(r.path == "/callback" for r in received)


def test_failed_delivery_is_retried_with_backoff(sim: SimHandle, http: requests.Session,
                                                listener: CallbackListener) -> None:
    listener.statuses = [500, 503]  # the first two POSTs fail
    task_id = start(sim, http, listener)
    listener.wait_count(3)
    # the listener sees a delivery before the simulator records its answer: wait for the record too
    log = attempts(sim.wait_for(lambda stats: len(attempts(stats, task_id)) == 5), task_id)
    assert [(e["status"], e["attempt"], e["http_status"]) for e in log] == [
        ("submitted", 1, 500), ("submitted", 2, 503), ("submitted", 3, 200),
        ("processing", 1, 200), ("succeed", 1, 200)]
    # lower bounds only: the back-off knob is 0.05 s in these tests, doubling after each failure
    assert log[1]["at"] - log[0]["at"] >= 45
    assert log[2]["at"] - log[1]["at"] >= 95


def test_delivery_gives_up_after_the_retries(sim: SimHandle, http: requests.Session) -> None:
    sim.control(callback_retries=2)
    dead = f"http://127.0.0.1:{free_port()}/nobody-home"
    task_id = create(sim, http, callback_url=dead).json()["data"]["task_id"]
    stats = sim.wait_for(lambda s: len(s["callbacks"].get(task_id, [])) == 9)
    log = attempts(stats, task_id)
    assert [(e["status"], e["attempt"]) for e in log] == [
        (s, a) for s in ("submitted", "processing", "succeed") for a in (1, 2, 3)]
    assert all("error" in e and "http_status" not in e for e in log)


def test_drop_knob_sends_nothing(sim: SimHandle, http: requests.Session, listener: CallbackListener) -> None:
    sim.control(callback_drop_every_n=1)
    task_id = start(sim, http, listener)
    wait_task(sim, task_id)
    stats = sim.wait_for(lambda s: len(s["callbacks"].get(task_id, [])) == 3)
    assert [(e["status"], e.get("dropped")) for e in attempts(stats, task_id)] == [
        ("submitted", True), ("processing", True), ("succeed", True)]
    assert listener.received == []


def test_drop_every_second_callback(sim: SimHandle, http: requests.Session, listener: CallbackListener) -> None:
    sim.control(callback_drop_every_n=2)
    task_id = start(sim, http, listener)
    wait_task(sim, task_id)
    sim.wait_for(lambda s: len(s["callbacks"].get(task_id, [])) == 3)
    assert listener.wait_count(2) and listener.statuses_received() == ["submitted", "succeed"]


def test_duplicate_knob(sim: SimHandle, http: requests.Session, listener: CallbackListener) -> None:
    sim.control(callback_duplicate=3)
    task_id = start(sim, http, listener)
    listener.wait_count(9)
    assert listener.statuses_received() == ["submitted"] * 3 + ["processing"] * 3 + ["succeed"] * 3
    stats = sim.wait_for(lambda s: len(s["callbacks"].get(task_id, [])) == 9)
    assert all(e["http_status"] == 200 for e in attempts(stats, task_id))


def test_reorder_knob_sends_the_final_status_before_processing(sim: SimHandle, http: requests.Session,
                                                             listener: CallbackListener) -> None:
    sim.control(callback_reorder=True)
    start(sim, http, listener)
    listener.wait_count(3)
    assert listener.statuses_received() == ["submitted", "succeed", "processing"]


def test_reorder_with_a_failed_task(sim: SimHandle, http: requests.Session, listener: CallbackListener) -> None:
    sim.control(callback_reorder=True, fail_every_n=1)
    start(sim, http, listener)
    listener.wait_count(3)
    assert listener.statuses_received() == ["submitted", "failed", "processing"]


def test_delay_knob_holds_each_callback_back(sim: SimHandle, http: requests.Session,
                                            listener: CallbackListener) -> None:
    sim.control(callback_delay=0.6)
    start(sim, http, listener)
    received = listener.wait_count(3)
    assert [r.body["task_status"] for r in received] == ["submitted", "processing", "succeed"]
    for r in received:  # a lower bound only: each callback left at least the delay after its change
        assert r.at * 1000 - r.body["updated_at"] >= 550


def test_no_callback_url_means_no_callbacks(sim: SimHandle, http: requests.Session) -> None:
    task_id = create(sim, http).json()["data"]["task_id"]
    wait_task(sim, task_id)
    assert sim.stats()["callbacks"] == {}


def test_callbacks_are_unsigned_by_default(sim: SimHandle, http: requests.Session,
                                           listener: CallbackListener) -> None:
    start(sim, http, listener)
    received = listener.wait_count(3)
    assert not any(k.startswith("webhook-") for r in received for k in r.headers)


def test_a_webhook_secret_signs_every_callback(sim_logs: Path, http: requests.Session,
                                               listener: CallbackListener) -> None:
    """Issue 9 item 7: Standard Webhooks, as Kling signs once a secret exists in its console."""
    key = b"kling-console-key-0123456789"
    with running_simulator(sim_logs, *FAST, "--webhook-secret", "whsec_" + base64.b64encode(key).decode()) as sim:
        listener.statuses = [500]  # the first delivery fails: its retry keeps the id, with a fresh timestamp
        start(sim, http, listener)
        received = listener.wait_count(3)
    ids = set()
    for r in received:
        msg_id, stamp = r.headers["webhook-id"], r.headers["webhook-timestamp"]
        digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + r.raw, hashlib.sha256).digest()
        assert r.headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()
        assert abs(int(stamp) - time.time()) < 60
        ids.add(msg_id)
    assert len(ids) == 3


def test_a_plain_webhook_secret_is_used_as_its_bytes(sim_logs: Path, http: requests.Session,
                                                     listener: CallbackListener) -> None:
    with running_simulator(sim_logs, *FAST, "--webhook-secret", "plain-secret") as sim:
        start(sim, http, listener)
        first = listener.wait_count(1)[0]
    msg = f"{first.headers['webhook-id']}.{first.headers['webhook-timestamp']}.".encode() + first.raw
    digest = hmac.new(b"plain-secret", msg, hashlib.sha256).digest()
    assert first.headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()
