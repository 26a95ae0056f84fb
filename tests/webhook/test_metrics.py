"""`GET /metrics` of the web app (issue 10.3) over a real redis-server: who may scrape it, that promtool finds the
scrape clean, the job store's gauges read at scrape time, and callback outcomes counted."""

from __future__ import annotations

from collections.abc import Iterator

from flask.testing import FlaskClient

from kling_relay.shared import flow, keys
from kling_relay.shared.jobs import JobState
from kling_relay.shared.kling import KlingTask
from kling_relay.shared.pipeline import record_task
from kling_relay.shared.queue import make_celery
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.settings import Secret
from kling_relay.shared.tokens import callback_token
from kling_relay.webhook.app import create_app
from tests.support import promtool
from tests.webhook.conftest import CALLBACK_SECRET, TOKENS, app_settings, auth

REQUEST = {"model_name": "kling-v1-6", "image_list": [{"image": "https://img.example.com/a.png"}], "prompt": "p",
           "mode": "std", "duration": "5", "aspect_ratio": "16:9"}
METRICS_TOKEN = "metrics-token-0123456789abcdef"


def _client(redis_url: str, **env: str) -> Iterator[FlaskClient]:
    settings = app_settings(redis_url, **env)
    celery_app = make_celery(redis_url)
    rt = Runtime.from_settings(settings, celery_app)
    yield create_app(runtime=rt).test_client()
    rt.redis.close()
    rt.http.close()
    celery_app.close()


def test_metrics_need_a_token_by_default(client: FlaskClient) -> None:
    answer = client.get("/metrics")
    assert answer.status_code == 401 and "Bearer" in answer.headers["WWW-Authenticate"]
    assert client.get("/metrics", headers=auth("not-a-token-0123456789")).status_code == 401
    answer = client.get("/metrics", headers=auth(TOKENS[1]))  # METRICS_TOKENS unset: an API token will do
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    assert "kling_relay_jobs" in answer.get_data(as_text=True)


def test_metrics_tokens_replace_the_api_tokens(redis_url: str) -> None:
    for client in _client(redis_url, METRICS_TOKENS=METRICS_TOKEN):
        assert client.get("/metrics", headers=auth(TOKENS[0])).status_code == 401
        assert client.get("/metrics", headers=auth(METRICS_TOKEN)).status_code == 200


def test_with_ops_tokens_an_app_token_gets_403_and_an_operator_scrapes(redis_url: str) -> None:
    """Issue 13: /metrics is an ops route once OPS_TOKENS is set (and METRICS_TOKENS is not)."""
    ops = "ops-token-0123456789abcdef"
    for client in _client(redis_url, OPS_TOKENS=f"oncall:{ops}"):
        assert client.get("/metrics", headers=auth(TOKENS[0])).status_code == 403
        assert client.get("/metrics", headers=auth("not-a-token-0123456789")).status_code == 401
        assert client.get("/metrics", headers=auth(ops)).status_code == 200


def test_metrics_public_needs_no_token(redis_url: str) -> None:
    for client in _client(redis_url, METRICS_PUBLIC="true"):
        assert client.get("/metrics").status_code == 200


def test_the_scrape_is_promtool_clean(client: FlaskClient, runtime: Runtime) -> None:
    runtime.store.create(dict(REQUEST))
    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    assert promtool.check_metrics(text) == ""


def test_gauges_are_read_from_redis_at_scrape_time(client: FlaskClient, runtime: Runtime) -> None:
    queued, _ = runtime.store.create(dict(REQUEST))
    second, _ = runtime.store.create(dict(REQUEST))
    record_task(runtime, second.id, KlingTask("task-2", "processing", external_task_id=second.id),
                source="worker", detail={})
    runtime.redis.rpush("copy", "m1", "m2", "m3")
    flow.pause(runtime.redis, code=1102, message="arrears", job_id=queued.id)
    runtime.redis.zadd(keys.JOBS_DUE, {queued.id: 1.0})  # due in 1970: overdue by far

    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    assert promtool.value(text, "kling_relay_jobs", state="queued") == 1
    assert promtool.value(text, "kling_relay_jobs", state="processing") == 1
    assert promtool.value(text, "kling_relay_jobs", state="stored") == 0
    assert promtool.value(text, "kling_relay_queue_depth", queue="copy") == 3
    assert promtool.value(text, "kling_relay_queue_depth", queue="submit") >= 0
    assert promtool.value(text, "kling_relay_kling_in_flight", kind="processing") == 1
    assert promtool.value(text, "kling_relay_kling_in_flight_limit") == runtime.settings.kling_max_in_flight
    assert promtool.value(text, "kling_relay_submission_paused", reason="account") == 1
    assert promtool.value(text, "kling_relay_submission_paused", reason="auth") == 0
    assert promtool.value(text, "kling_relay_jobs_overdue") == 1
    assert promtool.value(text, "kling_relay_redis_up") == 1

    flow.resume(runtime.redis)
    runtime.redis.delete("copy")
    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    assert promtool.value(text, "kling_relay_submission_paused", reason="account") == 0
    assert promtool.value(text, "kling_relay_queue_depth", queue="copy") == 0


def test_a_scrape_without_redis_still_answers(redis_url: str) -> None:
    for client in _client(redis_url, REDIS_URL="redis://127.0.0.1:9/0"):
        answer = client.get("/metrics", headers=auth())
        assert answer.status_code == 200
        text = answer.get_data(as_text=True)
        assert promtool.value(text, "kling_relay_redis_up") == 0
        assert "kling_relay_jobs{" not in text and promtool.check_metrics(text) == ""


def _callback(client: FlaskClient, job_id: str, task_id: str, status: str, token: str | None = None) -> int:
    token = token or callback_token(Secret(CALLBACK_SECRET), job_id)
    body = {"task_id": task_id, "task_status": status, "task_status_msg": "",
            "task_info": {"external_task_id": job_id}}
    code: int = client.post(f"/callbacks/kling/{job_id}?token={token}", json=body).status_code
    return code


def _outcomes(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics", headers=auth()).get_data(as_text=True)
    counts = {o: promtool.value(text, "kling_relay_callbacks_total", outcome=o)
              for o in ("applied", "duplicate", "stale", "early", "refused")}
    counts.update({f"refused:{r}": promtool.value(text, "kling_relay_callbacks_refused_total", reason=r)
                   for r in ("token", "task_mismatch")})
    counts["to_processing"] = promtool.value(text, "kling_relay_job_transitions_total", from_state="submitted",
                                             to_state="processing")
    return counts


def test_callback_outcomes_are_counted(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(dict(REQUEST))
    before = _outcomes(client)
    assert _callback(client, job.id, "task-1", "processing") == 202  # before the worker recorded the task
    record_task(runtime, job.id, KlingTask("task-1", "submitted", external_task_id=job.id), source="worker",
                detail={})
    assert _callback(client, job.id, "task-1", "processing") == 200  # applied
    assert _callback(client, job.id, "task-1", "processing") == 200  # duplicate
    assert _callback(client, job.id, "task-1", "submitted") == 200  # stale
    assert _callback(client, job.id, "task-9", "processing") == 409  # another task
    assert _callback(client, job.id, "task-1", "processing", token="0" * 64) == 403  # bad token
    after = _outcomes(client)
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"applied": 1, "duplicate": 1, "stale": 1, "early": 1, "refused": 2, "refused:token": 1,
                     "refused:task_mismatch": 1, "to_processing": 1}
    assert runtime.store.require(job.id).state is JobState.PROCESSING
