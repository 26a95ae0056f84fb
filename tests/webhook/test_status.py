"""Submission status and resume: over HTTP (Flask app on a real redis), the Python client and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from kling_relay.shared import flow, usage
from kling_relay.shared.client import Relay
from kling_relay.shared.runtime import Runtime
from tests.webhook.conftest import auth

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_status_and_resume_over_http(client: FlaskClient, runtime: Runtime) -> None:
    assert client.get("/v1/status").status_code == 401
    assert client.post("/v1/submission/resume").status_code == 401
    open_ = client.get("/v1/status", headers=auth()).json
    assert open_["submission"] == "open" and open_["pause"] is None and "queued" in open_["jobs"]
    assert client.get("/healthz").json == {"status": "ok", "submission": "open"}

    assert flow.pause(runtime.redis, code=1101, message="account in arrears", job_id="job_x")
    paused = client.get("/v1/status", headers=auth()).json
    assert paused["submission"] == "paused"
    assert paused["pause"]["code"] == 1101 and paused["pause"]["reason"] == "account"
    assert paused["pause"]["message"] == "account in arrears"
    assert client.get("/healthz").json["submission"] == "paused"
    assert "arrears" not in client.get("/healthz").text  # no token, no details

    resumed = client.post("/v1/submission/resume", headers=auth()).json
    assert resumed["resumed"] is True and resumed["pause"]["code"] == 1101
    assert client.get("/v1/status", headers=auth()).json["submission"] == "open"
    again = client.post("/v1/submission/resume", headers=auth()).json
    assert again == {"resumed": False, "pause": None}


def _env(runtime: Runtime) -> dict[str, str]:
    s = runtime.settings
    return {**os.environ, "REDIS_URL": s.redis_url, "KLING_BASE_URL": s.kling_base_url,
            "KLING_API_KEY": "k" * 32, "PUBLIC_BASE_URL": s.public_base_url,
            "CALLBACK_SECRET": s.callback_secret.reveal(), "API_TOKENS": s.api_tokens[0].reveal(),
            "S3_BUCKET": s.s3_bucket}


def test_status_and_resume_from_python_and_the_cli(runtime: Runtime) -> None:
    env = _env(runtime)
    relay = Relay.from_env(env)
    flow.pause(runtime.redis, code=1002, message="token invalid")
    assert relay.status()["submission"] == "paused"
    out = subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "submission", "status"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pause"]["reason"] == "auth"
    out = subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "submission", "resume"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["resumed"] is True
    assert relay.status()["submission"] == "open"
    assert relay.resume_submission() is None
    relay.close()


def test_config_prints_no_secret(runtime: Runtime) -> None:
    env = {**_env(runtime), "REDIS_URL": runtime.settings.redis_url.replace("redis://", "redis://:pw1234567@")}
    out = subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", "config"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert "pw1234567" not in out.stdout and "k" * 32 not in out.stdout and CALLBACK not in out.stdout
    assert shown["kling_api_key"] == "***" and shown["redis_url"].startswith("redis://:***@")


CALLBACK = "callback-secret-0123456789abcdef"


def test_a_budget_pause_in_the_status_and_its_resume_overrides_the_budget_for_the_day(
        client: FlaskClient, runtime: Runtime) -> None:
    """Issue 9 item 6: the status shows a budget pause (budget, when it ends by itself) and the units spent; an
    operator's resume of it switches the guard off until midnight UTC, over HTTP and from Python alike."""
    verdict = usage.Verdict(False, spent=9, in_flight=2, estimate=1, budget=10)
    document = client.get("/openapi.json").json
    for resume in ("http", "python"):
        assert usage.pause_for_budget(runtime.redis, verdict, job_id="job_x", combo="kling-v1-6|std|5")
        status = client.get("/v1/status", headers=auth()).json
        assert status["submission"] == "paused" and status["pause"]["reason"] == "budget"
        assert status["pause"]["budget"] == 10 and status["pause"]["resume_at"].endswith("T00:00:00.000Z")
        assert status["pause"]["message"] == ("daily unit budget 10 reached: spent today 9 + in flight "
                                              "(estimated) 2 + next job 1")
        assert status["units"]["budget_override"] is False
        root = {"$ref": "#/components/schemas/Status", "components": document["components"]}
        assert list(Draft202012Validator(root).iter_errors(status)) == []
        if resume == "http":
            resumed = client.post("/v1/submission/resume", headers=auth()).json
            assert resumed["resumed"] is True and resumed["pause"]["reason"] == "budget"
        else:
            relay = Relay.from_env(_env(runtime))
            assert relay.resume_submission() is not None
            relay.close()
        status = client.get("/v1/status", headers=auth()).json
        assert status["submission"] == "open" and status["units"]["budget_override"] is True
        runtime.redis.delete("kr:usage:override")
