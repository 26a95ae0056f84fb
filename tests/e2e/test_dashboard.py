"""The dashboard in a real browser: Playwright driving Debian's chromium (/usr/bin/chromium, installed by
deploy/bootstrap.sh; nothing is downloaded) against the whole stack (gunicorn, Celery, Redis, moto S3, the simulator).

It signs in (a wrong token first), watches the demo's three jobs reach `stored` on the live jobs page, plays one's
video (readyState >= 2 from the presigned S3 URL), retries a job that Kling refused, cancels a job left queued by
a paused submission and resumes submission, checks that a POST without its CSRF token is refused, and signs out.
A screenshot of each page goes to `.test-output/dashboard/`; with DASHBOARD_SCREENSHOT_DOCS=1 the overview's is
also written to docs/dashboard-overview.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from deploy.demo import JOBS, _b64
from deploy.stack import DEMO_API_TOKEN, LocalStack
from tests.e2e.conftest import job_body, submit, wait_jobs

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ".test-output" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run deploy/bootstrap.sh (make setup), which installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.on("dialog", lambda dialog: dialog.accept())  # the confirmation of each action
    p.set_default_timeout(30_000)
    yield p
    context.close()


def shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_api(stack: LocalStack, path: str, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.api("GET", path).json()
        if check(body):
            return body
        time.sleep(0.3)
    pytest.fail(f"{path} never matched: {body}\n{stack.logs_tail()}")


def demo_jobs(stack: LocalStack) -> list[str]:
    ids = []
    for spec in JOBS:
        body = {"model_name": "kling-v1-6", "image_list": [{"image": _b64(n)} for n in spec["images"]],
                "prompt": spec["prompt"], "aspect_ratio": spec["aspect_ratio"], "duration": "5",
                "metadata": {"demo": spec["name"], "note": "<b>not bold</b>"}}
        ids.append(submit(stack, body, headers={"Idempotency-Key": f"dash-{spec['name']}-{uuid.uuid4().hex}"}))
    return ids


def test_dashboard_in_a_browser(stack: LocalStack, clean_sim: LocalStack, page: Any) -> None:
    base = stack.web_url + "/dashboard"

    # -- sign-in: a wrong token is refused -----------------------------------------------------------------
    page.goto(base + "/")
    assert page.url.endswith("/dashboard/signin")
    shot(page, "signin")
    page.fill("#token", "wrong-token-0123456789abcdef")
    with page.expect_response(lambda r: r.url.endswith("/dashboard/signin") and r.request.method == "POST") as rsp:
        page.click("#signin")
    assert rsp.value.status == 401
    assert page.is_visible("#refused")
    page.fill("#token", DEMO_API_TOKEN)
    page.click("#signin")
    page.wait_for_url(base + "/")
    assert DEMO_API_TOKEN not in page.content()

    # -- the demo's jobs reach stored on the live jobs page --------------------------------------------------
    ids = demo_jobs(stack)
    page.goto(base + "/jobs")
    for job_id in ids:
        page.wait_for_selector(f'tr[data-job="{job_id}"][data-state="stored"]', timeout=WAIT_MS)
    assert "<b>not bold</b>" in page.inner_text("#jobs")  # shown as text, not markup
    shot(page, "jobs")

    # -- one job: the video plays from its presigned S3 URL ----------------------------------------------------
    page.click(f'tr[data-job="{ids[0]}"] a')
    page.wait_for_selector("#videos video")
    page.wait_for_function("document.querySelector('#videos video').readyState >= 2", timeout=WAIT_MS)
    assert page.evaluate("document.querySelector('#videos video').videoWidth") > 0
    assert page.is_visible("#manifest") and page.is_visible("#timeline")
    shot(page, "job")

    # -- retry a job Kling refused -------------------------------------------------------------------------
    stack.sim_control(force_error_code=1201, force_error_on="create")
    refused = submit(stack, job_body(91))
    wait_jobs(stack, [refused])
    stack.sim_control(force_error_code=0)
    page.goto(f"{base}/jobs/{refused}")
    assert page.inner_text("#job-state") == "failed" and "kling_rejected:1201" in page.inner_text("#error")
    page.fill("#retry-form input[name=reason]", "Kling accepts again")
    page.click("#retry")
    page.wait_for_selector(".flash.ok")
    assert "retry done" in page.inner_text(".flash.ok")
    assert wait_jobs(stack, [refused])[refused]["state"] == "stored"

    # -- cancel a job left queued by a paused submission, then resume ------------------------------------------
    stack.sim_control(force_error_code=1101, force_error_on="create")
    queued = submit(stack, job_body(92))
    wait_api(stack, "/v1/status", lambda s: s["submission"] == "paused")
    stack.sim_control(force_error_code=0)
    assert stack.api("GET", f"/v1/jobs/{queued}").json()["state"] == "queued"
    page.goto(f"{base}/jobs/{queued}")
    page.fill("#cancel-form input[name=reason]", "customer left")
    page.click("#cancel")
    page.wait_for_selector(".flash.ok")
    assert page.inner_text("#job-state") == "canceled"
    assert "customer left" in page.inner_text("#timeline")
    page.goto(base + "/")
    assert page.inner_text("#submission-state") == "paused"
    page.click("#resume-submission")
    page.wait_for_selector(".flash.ok")
    assert page.inner_text("#submission-state") == "open"
    assert stack.api("GET", "/v1/status").json()["submission"] == "open"
    assert page.inner_text('#counts td[data-state="stored"]') != "0"
    overview = shot(page, "overview")
    if os.environ.get("DASHBOARD_SCREENSHOT_DOCS") == "1":
        shutil.copyfile(overview, ROOT / "docs" / "dashboard-overview.png")

    # -- a form without its CSRF token is refused (the browser's own cookies, the same origin) ------------------
    status = page.evaluate("""async () => {
        const r = await fetch('/dashboard/submission/resume', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'x=1'});
        return r.status; }""")
    assert status == 403
    status = page.evaluate(f"""async () => {{
        const r = await fetch('/dashboard/jobs/{ids[1]}/cancel', {{method: 'POST', credentials: 'same-origin',
            headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'csrf_token=forged'}});
        return r.status; }}""")
    assert status == 403
    assert stack.api("GET", f"/v1/jobs/{ids[1]}").json()["state"] == "stored"

    # -- sign out ------------------------------------------------------------------------------------------
    page.click("#signout")
    page.wait_for_url(base + "/signin")
    page.goto(base + "/jobs")
    assert page.url.endswith("/dashboard/signin")
