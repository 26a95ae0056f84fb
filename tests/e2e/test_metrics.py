"""Prometheus metrics on the real stack (issue 10.3 and 10.4): jobs run through gunicorn (two workers), a Celery
worker (four prefork processes), the simulator and moto; then the web's `/metrics` and the worker's endpoint are
scraped and each scrape is piped through `promtool check metrics`. Counts made in several processes of one group
add up (prometheus_client's multiprocess mode), and the Grafana dashboard and the alert rules use only names
that a real scrape has.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from deploy.procs import free_port
from deploy.stack import DEMO_API_TOKEN, LocalStack
from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.queue import RECONCILE_QUEUE, RECONCILE_TASK, make_celery
from kling_relay.shared.redis_conn import redis_client
from tests.e2e.conftest import job_body, submit, wait_jobs
from tests.e2e.test_pipeline import callback_token_for
from tests.support import promtool
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kling-relay.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\bkling_relay_[a-z0-9_]+\b")


def scrape_web(stack: LocalStack) -> str:
    answer = requests.get(stack.web_url + "/metrics", headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"},
                          timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    return answer.text


def scrape_worker(stack: LocalStack, name: str = "worker1") -> str:
    """The worker's endpoint (started with the worker: waited for, as the stack waits for the web only)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = requests.get(stack.worker_metrics_url(name), timeout=10)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answer.status_code == 200, answer.text
    return answer.text


def both(stack: LocalStack, name: str, **labels: str) -> float:
    """A counter summed over the web and the worker, as a Prometheus query summing over targets would."""
    return promtool.value(scrape_web(stack), name, **labels) + promtool.value(scrape_worker(stack), name, **labels)


def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"never happened: {what}")


def test_a_demo_run_is_counted_and_every_scrape_is_promtool_clean(clean_sim: LocalStack) -> None:
    stack = clean_sim
    before_web, before_worker = scrape_web(stack), scrape_worker(stack)

    ids = [submit(stack, job_body(n)) for n in range(3)]
    jobs = wait_jobs(stack, ids)
    assert {j["state"] for j in jobs.values()} == {"stored"}
    celery_app = make_celery(stack.redis.url)
    try:
        celery_app.send_task(RECONCILE_TASK, queue=RECONCILE_QUEUE)
    finally:
        celery_app.close()
    wait_for(lambda: promtool.value(scrape_worker(stack), "kling_relay_reconcile_passes_total", result="ran")
             > promtool.value(before_worker, "kling_relay_reconcile_passes_total", result="ran"),
             "a reconcile pass counted by the worker")
    wait_for(lambda: promtool.value(scrape_worker(stack), "kling_relay_copy_duration_seconds_count")
             - promtool.value(before_worker, "kling_relay_copy_duration_seconds_count") >= 3, "three copies counted")

    web, worker = scrape_web(stack), scrape_worker(stack)
    assert promtool.check_metrics(web) == ""
    assert promtool.check_metrics(worker) == ""

    def delta(text: str, before: str, name: str, **labels: str) -> float:
        return promtool.value(text, name, **labels) - promtool.value(before, name, **labels)

    def delta_both(name: str, **labels: str) -> float:
        return delta(web, before_web, name, **labels) + delta(worker, before_worker, name, **labels)

    # Job steps, wherever they were made (the API, a callback in either gunicorn worker, a Celery process).
    assert delta_both("kling_relay_job_transitions_total", from_state="queued", to_state="submitted") == 3
    assert delta_both("kling_relay_job_transitions_total", from_state="generated", to_state="stored") == 3
    assert delta_both("kling_relay_generation_duration_seconds_count") == 3
    # Kling requests: three creates at least, answered with code 0, each timed.
    assert delta(worker, before_worker, "kling_relay_kling_requests_total", endpoint="create", code="0") == 3
    assert delta(worker, before_worker, "kling_relay_kling_request_duration_seconds_count", endpoint="create") == 3
    # Copies: bytes as stored.
    stored_bytes = sum(v["bytes"] for j in jobs.values() for v in j["videos"])
    assert delta(worker, before_worker, "kling_relay_copy_bytes_total") == stored_bytes
    assert delta(worker, before_worker, "kling_relay_task_runs_total", task="copy", outcome="stored") == 3
    assert delta(worker, before_worker, "kling_relay_task_runs_total", task="submit", outcome="submitted") == 3
    assert promtool.value(worker, "kling_relay_reconcile_last_pass_timestamp_seconds") > time.time() - 120
    # The job store's gauges, read from Redis by the web process at scrape time.
    assert promtool.value(web, "kling_relay_jobs", state="stored") >= 3
    assert promtool.value(web, "kling_relay_redis_up") == 1
    assert "kling_relay_jobs{" not in worker  # the gauges are the web's only: a sum over targets counts once
    # The dashboard and the alerts query only names that these scrapes have.
    assert names_unknown_to(promtool.family_names(web) | promtool.family_names(worker)) == {}


def test_counts_add_up_across_gunicorn_workers(stack: LocalStack) -> None:
    """Forty refused callbacks, each on its own connection, spread over the web process's workers: the one scrape
    counts all forty, whichever worker serves it (without multiprocess mode each worker would report its own)."""
    before = promtool.value(scrape_web(stack), "kling_relay_callbacks_refused_total", reason="token")
    for _ in range(40):
        with requests.Session() as session:
            answer = session.post(stack.web_url + "/callbacks/kling/job_0123456789abcdef?token=bad", json={},
                                  timeout=10)
        assert answer.status_code == 403
    for _ in range(10):  # every scrape, whichever worker answers it, sees all forty
        after = promtool.value(scrape_web(stack), "kling_relay_callbacks_refused_total", reason="token")
        assert after - before == 40


def test_metrics_are_not_public(stack: LocalStack) -> None:
    assert requests.get(stack.web_url + "/metrics", timeout=10).status_code == 401


def names_unknown_to(exported: set[str]) -> dict[str, list[str]]:
    """Expression → the metric names in it that `exported` lacks, for every query of the Grafana dashboard and every
    alert rule (each must name at least one of the relay's metrics)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [r["expr"] for group in rules["groups"] for r in group["rules"]]
    assert len(exprs) > 10
    unknown = {}
    for expr in exprs:
        names = set(_NAME.findall(expr))
        assert names, f"an expression without a relay metric: {expr}"
        if names - exported:
            unknown[expr] = sorted(names - exported)
    return unknown


def test_recycled_web_workers_keep_their_counts_and_duplicates_change_nothing(stack: LocalStack) -> None:
    """deploy/gunicorn.conf.py recycles each web worker after about 10,000 requests (max_requests); here a web
    process on the same config recycles after 8, so its workers are replaced during 40 callbacks
    for one job (1 applied, 39 duplicate or stale, each on its own connection). The scrape still counts every one
    (an exited worker's counter files stay in the master's directory), and the duplicates changed nothing."""
    port = free_port()
    argv = [stack.python, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
            "--workers", "2", "--max-requests", "8", "--max-requests-jitter", "0", "kling_relay.webhook.wsgi:app"]
    proc = stack._spawn("web-recycling", argv, port, overrides={"PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    client = redis_client(stack.redis.url)
    store = JobStore(client)
    try:
        job, _ = store.create({"model_name": "kling-v1-6", "prompt": "recycled"}, source="api")
        store.set_kling_task_id(job.id, "task-recycled", source="worker")
        store.step(job.id, JobState.SUBMITTED, source="worker")
        path = f"{url}/callbacks/kling/{job.id}?token={callback_token_for(job.id)}"
        statuses = ["processing"] + ["processing", "submitted"] * 19 + ["processing"]
        answers = []
        for status in statuses:
            with requests.Session() as session:
                answers.append(session.post(path, json={"task_id": "task-recycled", "task_status": status,
                                                        "task_info": {"external_task_id": job.id},
                                                        "created_at": 1700000000000, "updated_at": 1700000000000},
                                            timeout=30))
        assert [a.status_code for a in answers] == [200] * 40
        assert [a.json()["applied"] for a in answers] == [True] + [False] * 39
        assert store.require(job.id).state is JobState.PROCESSING
        # A worker that reached its count stops accepting within a second (gevent's worker checks once a second),
        # so it may serve more than 8; at least one of the two did reach 8 and has been replaced by now.
        assert "Autorestarting worker" in proc.log_path.read_text()
        wait_until(lambda: proc.log_path.read_text().count("Booting worker") >= 3, timeout=60,
                   what="a recycled web worker replaced")
        for _ in range(4):  # whichever (new) worker answers the scrape, every callback is counted once
            answer = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"},
                                  timeout=10)
            assert answer.status_code == 200, answer.text
            counted = {outcome: promtool.value(answer.text, "kling_relay_callbacks_total", outcome=outcome)
                       for outcome in ("applied", "duplicate", "stale")}
            assert counted == {"applied": 1, "duplicate": 20, "stale": 19}
    finally:
        stack.processes.pop("web-recycling").stop()
        client.close()
