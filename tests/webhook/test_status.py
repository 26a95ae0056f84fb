"""Submission and copy status and resume: over HTTP (Flask app on a real redis), the Python client and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from kling_relay.shared import copy_flow, flow, usage
from kling_relay.shared.client import Relay
from kling_relay.shared.jobs import JobState
from kling_relay.shared.runtime import Runtime
from tests.webhook.conftest import app_env, auth
from tests.webhook.test_openapi import conforms

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_status_and_resume_over_http(client: FlaskClient, runtime: Runtime) -> None:
    assert client.get("/v1/status").status_code == 401
    assert client.post("/v1/submission/resume").status_code == 401
    open_ = client.get("/v1/status", headers=auth()).json
    assert open_["submission"] == "open" and open_["pause"] is None and "queued" in open_["jobs"]
    assert client.get("/healthz").json == {"status": "ok", "submission": "open", "copy": "open"}

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
    """The environment the runtime's settings came from, for the CLI in a subprocess."""
    return {**os.environ, **app_env(runtime.settings.redis_url)}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `kling-relay *args` (the CLI module) in a subprocess with `env`; its output as text."""
    return subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_status_and_resume_from_python_and_the_cli(runtime: Runtime) -> None:
    env = _env(runtime)
    relay = Relay.from_env(env)
    flow.pause(runtime.redis, code=1002, message="token invalid")
    assert relay.status()["submission"] == "paused"
    out = _cli(env, "submission", "status")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pause"]["reason"] == "auth"
    out = _cli(env, "submission", "resume")
    assert out.returncode == 0 and json.loads(out.stdout)["resumed"] is True
    assert relay.status()["submission"] == "open"
    assert relay.resume_submission() is None
    relay.close()


def test_copy_pause_and_waits_show_in_status_and_resume_over_http(client: FlaskClient, runtime: Runtime) -> None:
    """Issue 9.9: a copy paused by storage (no bucket) shows in /v1/status and /healthz; POST /v1/copy/resume
    clears it. Issue 9.1: a job waiting on a refused video host is listed under copy_waiting."""
    assert client.post("/v1/copy/resume").status_code == 401
    open_ = client.get("/v1/status", headers=auth()).json
    assert open_["copy"] == "open" and open_["copy_pause"] is None
    assert open_["copy_waiting"] == {"count": 0, "jobs": []}

    job, _ = runtime.store.create({"prompt": "p"}, due_in=60)
    for state in (JobState.SUBMITTED, JobState.GENERATED):
        runtime.store.step(job.id, state, source="worker")
    copy_flow.wait(runtime.redis, job.id, reason="video_host_refused", host="p9.example.net",
                   message="https://p9.example.net:443 is not on VIDEO_URL_ALLOWLIST", until=None)
    assert copy_flow.pause(runtime.redis, code="NoSuchBucket", message="S3 get manifest failed: NoSuchBucket",
                           job_id=job.id)
    paused = client.get("/v1/status", headers=auth()).json
    assert paused["copy"] == "paused" and paused["submission"] == "open"
    assert paused["copy_pause"]["reason"] == "storage" and paused["copy_pause"]["code"] == "NoSuchBucket"
    assert paused["copy_pause"]["job_id"] == job.id and paused["copy_pause"]["since"]
    assert paused["copy_waiting"]["count"] == 1
    assert paused["copy_waiting"]["jobs"][0]["job_id"] == job.id
    assert paused["copy_waiting"]["jobs"][0]["host"] == "p9.example.net"
    assert client.get("/healthz").json["copy"] == "paused"
    assert "NoSuchBucket" not in client.get("/healthz").text  # no token, no details
    document = client.get("/openapi.json").json
    assert conforms(document, "Status", paused) == []
    assert conforms(document, "Health", client.get("/healthz").json) == []

    resumed = client.post("/v1/copy/resume", headers=auth()).json
    assert conforms(document, "CopyResumed", resumed) == []
    assert resumed["resumed"] is True and resumed["pause"]["code"] == "NoSuchBucket"
    assert client.get("/v1/status", headers=auth()).json["copy"] == "open"
    assert client.post("/v1/copy/resume", headers=auth()).json == {"resumed": False, "pause": None}

    runtime.store.step(job.id, JobState.CANCELED, source="api")
    assert client.get("/v1/status", headers=auth()).json["copy_waiting"]["count"] == 0, "a canceled job waits no more"


def test_copy_status_and_resume_from_python_and_the_cli(runtime: Runtime) -> None:
    env = _env(runtime)
    relay = Relay.from_env(env)
    copy_flow.pause(runtime.redis, code="NoCredentials", message="S3 get manifest failed: no credentials")
    assert relay.status()["copy"] == "paused"
    out = _cli(env, "copy", "status")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["copy"] == "paused" and shown["copy_pause"]["code"] == "NoCredentials"
    out = _cli(env, "copy", "resume")
    assert out.returncode == 0 and json.loads(out.stdout)["resumed"] is True
    assert relay.status()["copy"] == "open"
    assert relay.resume_copy() is None
    relay.close()


def test_config_prints_no_secret(runtime: Runtime) -> None:
    env = {**_env(runtime), "REDIS_URL": runtime.settings.redis_url.replace("redis://", "redis://:pw1234567@")}
    out = _cli(env, "config")
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
