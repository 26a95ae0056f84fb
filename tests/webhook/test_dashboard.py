"""The operators' dashboard through Flask's test client over a real redis-server: sign-in, the session cookie, CSRF,
escaping, the ops actions, search, and a bounded number of Redis reads per page with 100,000 jobs stored.

The browser test of the same pages against the whole stack is tests/e2e/test_dashboard.py.
"""

from __future__ import annotations

import re
import time
from typing import Any

import redis
from flask.testing import FlaskClient

from kling_relay.shared import flow, keys, stats
from kling_relay.shared.jobs import JobState
from kling_relay.shared.runtime import Runtime
from tests.webhook.conftest import TOKENS

REQUEST: dict[str, Any] = {"model_name": "kling-v1-6", "prompt": "p", "image_list": [{"image": "https://e.com/a.png"}]}
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, html
    return match.group(1)


def sign_in(client: FlaskClient, token: str = TOKENS[0]) -> str:
    """Sign in through the form; returns the CSRF token of the signed-in session."""
    page = client.get("/dashboard/signin")
    response = client.post("/dashboard/signin", data={"token": token, "csrf_token": csrf_of(page.text)})
    assert response.status_code == 302, response.text
    return csrf_of(client.get("/dashboard/").text)


def test_pages_need_a_session(client: FlaskClient) -> None:
    for path in ("/dashboard/", "/dashboard/jobs", "/dashboard/jobs/job_x"):
        response = client.get(path)
        assert response.status_code == 302 and response.headers["Location"].endswith("/dashboard/signin")


def test_wrong_token_is_refused(client: FlaskClient) -> None:
    page = client.get("/dashboard/signin")
    response = client.post("/dashboard/signin",
                           data={"token": "not-a-token-0123456789", "csrf_token": csrf_of(page.text)})
    assert response.status_code == 401 and "not accepted" in response.text
    assert client.get("/dashboard/").status_code == 302


def test_signin_without_its_csrf_token_is_refused(client: FlaskClient) -> None:
    client.get("/dashboard/signin")
    assert client.post("/dashboard/signin", data={"token": TOKENS[0]}).status_code == 403
    assert client.get("/dashboard/").status_code == 302


def test_session_cookie_flags_and_headers(client: FlaskClient) -> None:
    page = client.get("/dashboard/signin")
    response = client.post("/dashboard/signin", data={"token": TOKENS[1], "csrf_token": csrf_of(page.text)})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here
    assert TOKENS[1] not in cookie
    overview = client.get("/dashboard/")
    assert overview.status_code == 200
    assert "script-src 'self'" in overview.headers["Content-Security-Policy"]
    assert overview.headers["Referrer-Policy"] == "no-referrer"
    assert overview.headers["Cache-Control"] == "no-store"


def test_cookie_is_secure_over_https(client: FlaskClient) -> None:
    page = client.get("/dashboard/signin", base_url="https://relay.example")
    response = client.post("/dashboard/signin", base_url="https://relay.example",
                           data={"token": TOKENS[0], "csrf_token": csrf_of(page.text)})
    assert "Secure" in response.headers["Set-Cookie"]


def test_actions_need_the_csrf_token(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(REQUEST)
    sign_in(client)
    response = client.post(f"/dashboard/jobs/{job.id}/cancel", data={"reason": "no csrf"})
    assert response.status_code == 403 and "CSRF" in response.text
    response = client.post(f"/dashboard/jobs/{job.id}/cancel", data={"reason": "x", "csrf_token": "forged"})
    assert response.status_code == 403
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_post_without_a_session_is_refused(client: FlaskClient, runtime: Runtime) -> None:
    """A cross-site-style POST: no session cookie at all (SameSite=Strict would withhold it), CSRF field guessed."""
    job, _ = runtime.store.create(REQUEST)
    assert client.post(f"/dashboard/jobs/{job.id}/cancel", data={"csrf_token": "x"}).status_code == 403
    assert client.post("/dashboard/submission/resume", data={"csrf_token": "x"}).status_code == 403
    assert runtime.store.require(job.id).state is JobState.QUEUED


def test_signout_ends_the_session_even_for_a_copied_cookie(client: FlaskClient, app: Any) -> None:
    csrf = sign_in(client)
    cookie = client.get_cookie("kr_dashboard", path="/dashboard")
    assert cookie is not None
    assert client.post("/dashboard/signout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/dashboard/").status_code == 302
    other = app.test_client()
    other.set_cookie("kr_dashboard", cookie.value, path="/dashboard")
    assert other.get("/dashboard/").status_code == 302


def test_cancel_retry_and_resume(client: FlaskClient, runtime: Runtime) -> None:
    csrf = sign_in(client)
    job, _ = runtime.store.create(REQUEST)
    response = client.post(f"/dashboard/jobs/{job.id}/cancel", data={"reason": "not needed", "csrf_token": csrf},
                           follow_redirects=True)
    assert "cancel done" in response.text
    canceled = runtime.store.require(job.id)
    assert canceled.state is JobState.CANCELED
    last = runtime.store.events(job.id)[-1]
    assert last.detail["via"] == "dashboard" and last.detail["reason"] == "not needed"
    assert last.detail["dashboard_token"] == 1

    failed, _ = runtime.store.create(REQUEST)
    runtime.store.step(failed.id, JobState.FAILED, source="worker",
                       set_fields={"error": {"reason": "submit_exhausted", "message": "m", "code": None}})
    response = client.post(f"/dashboard/jobs/{failed.id}/retry", data={"csrf_token": csrf}, follow_redirects=True)
    assert "retry done" in response.text
    assert runtime.store.require(failed.id).state is JobState.QUEUED
    response = client.post(f"/dashboard/jobs/{job.id}/retry", data={"csrf_token": csrf}, follow_redirects=True)
    assert "retry refused" in response.text

    flow.pause(runtime.redis, code=1101, message="account in arrears")
    assert "account in arrears" in client.get("/dashboard/").text
    client.post("/dashboard/submission/resume", data={"csrf_token": csrf})
    assert flow.current_pause(runtime.redis) is None


def test_untrusted_text_is_escaped(client: FlaskClient, runtime: Runtime) -> None:
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>'
    job, _ = runtime.store.create({**REQUEST, "prompt": evil}, metadata={"note": evil})
    runtime.store.step(job.id, JobState.FAILED, source="worker",
                       set_fields={"error": {"reason": "kling_failed", "message": evil, "code": 5}})
    stats.count_finished(runtime.redis, "failed", reason=evil)
    sign_in(client)
    for path in (f"/dashboard/jobs/{job.id}", "/dashboard/jobs", "/dashboard/"):
        html = client.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html, path


def test_base64_images_are_thumbnails_not_text(client: FlaskClient, runtime: Runtime) -> None:
    from tests.support.relay_runtime import REQUEST as WITH_BASE64
    job, _ = runtime.store.create(WITH_BASE64)
    sign_in(client)
    html = client.get(f"/dashboard/jobs/{job.id}").text
    payload = WITH_BASE64["image_list"][0]["image"]
    assert payload[:40] not in html
    assert f"/dashboard/jobs/{job.id}/images/0" in html
    image = client.get(f"/dashboard/jobs/{job.id}/images/0")
    assert image.status_code == 200 and image.mimetype == "image/png"
    assert client.get(f"/dashboard/jobs/{job.id}/images/3").status_code == 404


def test_find_by_job_id_task_id_and_idempotency_key(client: FlaskClient, runtime: Runtime) -> None:
    job, _ = runtime.store.create(REQUEST, idempotency_key="order-42")
    runtime.store.set_kling_task_id(job.id, "task-abc-123", source="worker")
    assert runtime.redis.hget(keys.JOBS_BY_TASK, "task-abc-123") == job.id
    sign_in(client)
    for query, how in ((job.id, "job id"), ("task-abc-123", "Kling task id"), ("order-42", "idempotency key")):
        html = client.get("/dashboard/jobs", query_string={"q": query}).text
        assert f'data-job="{job.id}"' in html and f"found by {how}" in html
    assert "no job has this id" in client.get("/dashboard/jobs", query_string={"q": "nope"}).text
    runtime.redis.delete(keys.job(job.id))  # expired
    assert runtime.store.find_by_task("task-abc-123") is None
    assert runtime.redis.hget(keys.JOBS_BY_TASK, "task-abc-123") is None


def test_overview_shows_the_counters_and_the_last_pass(client: FlaskClient, runtime: Runtime) -> None:
    now = time.time()
    stats.count_finished(runtime.redis, "stored", now=now)
    stats.count_finished(runtime.redis, "failed", reason="copy_exhausted", now=now)
    series = stats.per_minute(runtime.redis, now=now)
    assert series["stored"][-1] == 1 and series["failed"][-1] == 1 and len(series["minutes"]) == 60
    runtime.redis.set(keys.RECONCILE_LAST, '{"at": 1764324000, "duration_ms": 12.5, "due": 3, "resubmitted": 1}')
    sign_in(client)
    html = client.get("/dashboard/").text
    assert "copy_exhausted" in html and "took 12.5 ms" in html and 'id="chart"' in html


# -- bounded reads with 100,000 jobs ------------------------------------------------------------------------------


def _fill(client: redis.Redis, n: int) -> str:
    """n jobs written straight into the store's keys (hash + indexes); returns a failed job's id."""
    states = [s.value for s in JobState]
    base = time.time() - n
    pipe = client.pipeline(transaction=False)
    failed_id = ""
    for i in range(n):
        job_id = f"job_fill{i:08d}"
        state = states[i % len(states)]
        if state == "failed":
            failed_id = job_id
        pipe.hset(keys.job(job_id), mapping={
            "id": job_id, "state": state, "notify_url": "", "metadata": "{}", "kling_task_id": f"t{i}",
            "created_at": repr(base + i), "updated_at": repr(base + i), "videos": "[]", "deadline_at": "",
            "error": '{"reason":"submit_exhausted","message":"m","code":null}' if state == "failed" else "null"})
        pipe.zadd(keys.JOBS_ALL, {job_id: base + i})
        pipe.zadd(keys.jobs_in_state(state), {job_id: base + i})
        pipe.hset(keys.JOBS_BY_TASK, f"t{i}", job_id)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return failed_id


def _commands(client: redis.Redis) -> int:
    info = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in info.items()
               if k.split("_", 1)[1] not in ("info", "config|resetstat", "config", "ping"))


def test_pages_read_a_bounded_number_of_keys_with_100k_jobs(client: FlaskClient, runtime: Runtime,
                                                           redis_url: str) -> None:
    """Counts Redis commands per page (INFO commandstats deltas): a page never scans the 100,000 jobs."""
    failed_id = _fill(runtime.redis, 100_000)
    sign_in(client)
    probe = redis.Redis.from_url(redis_url, decode_responses=True)
    pages = ["/dashboard/", "/dashboard/jobs", "/dashboard/jobs?state=failed", f"/dashboard/jobs/{failed_id}",
             f"/dashboard/jobs?q={failed_id}", "/dashboard/jobs?q=t77", "/dashboard/jobs?q=no-such-key"]
    html = client.get("/dashboard/jobs").text
    next_link = re.search(r'id="next-page" href="([^"]+)"', html)
    assert next_link
    pages.append(next_link.group(1).replace("&amp;", "&"))
    for page in pages:
        probe.config_resetstat()
        before = _commands(probe)
        response = client.get(page)
        assert response.status_code == 200, page
        used = _commands(probe) - before
        assert used <= 300, (page, used)  # a page of 50 jobs is ~50 reads; a scan would be 100,000
    probe.close()


def test_an_apps_idempotency_key_finds_its_job(client: FlaskClient, runtime: Runtime) -> None:
    """Issue 13: keys are scoped per app; the search still finds an app's job by its key."""
    job, _ = runtime.store.create(REQUEST, idempotency_key="order-77", app="app2")
    sign_in(client)
    html = client.get("/dashboard/jobs", query_string={"q": "order-77"}).text
    assert f'data-job="{job.id}"' in html and "found by idempotency key" in html


def test_app_tokens_cannot_sign_in_once_ops_tokens_are_set(redis_url: str) -> None:
    """Issue 13: the dashboard is for operators: OPS_TOKENS (or DASHBOARD_TOKENS); app tokens only while no
    operator token is set (then every API token is an operator)."""
    from kling_relay.shared.queue import make_celery
    from kling_relay.webhook.app import create_app
    from tests.webhook.conftest import app_settings

    ops = "oncall-ops-token-0123456789"
    celery_app = make_celery(redis_url)
    rt = Runtime.from_settings(app_settings(redis_url, OPS_TOKENS=f"oncall:{ops}"), celery_app)
    try:
        client = create_app(runtime=rt).test_client()
        page = client.get("/dashboard/signin")
        refused = client.post("/dashboard/signin", data={"token": TOKENS[0], "csrf_token": csrf_of(page.text)})
        assert refused.status_code == 401
        sign_in(client, ops)
    finally:
        rt.redis.close()
        rt.http.close()
        celery_app.close()
