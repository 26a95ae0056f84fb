"""The `kling-relay jobs` CLI checks what the HTTP API checks: the real command in a subprocess, on the test
redis-server (settings from the environment, as an operator runs it)."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
import redis

from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.queue import SUBMIT_QUEUE
from kling_relay.shared.runtime import Runtime
from tests.shared.test_ops import REQUEST, failed_job, messages
from tests.webhook.test_status import REPO_ROOT, _env


def jobs_cli(runtime: Runtime, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    """Run `kling-relay jobs ...`; bytes arguments reach it as they are (e.g. not UTF-8), as from a shell."""
    return subprocess.run([sys.executable.encode(), b"-m", b"kling_relay.shared.cli", b"jobs",
                           *(a if isinstance(a, bytes) else a.encode() for a in args)],
                          env=_env(runtime), cwd=REPO_ROOT, capture_output=True, text=True, errors="replace",
                          timeout=60)


@pytest.fixture()
def store(runtime: Runtime) -> JobStore:
    return runtime.store


@pytest.mark.parametrize("action", ["retry", "cancel"])
@pytest.mark.parametrize(("reason", "says"), [
    ("x" * 100_000, "at most 500"), (b"caf\xe9 latin-1", "not valid text"), ("bell\x07", "control characters"),
], ids=["100k-chars", "not-utf8", "control"])
def test_a_reason_the_api_refuses_is_exit_2_and_changes_nothing(
        runtime: Runtime, store: JobStore, redis_client: redis.Redis, action: str, reason: str | bytes,
        says: str) -> None:
    """Issue: the CLI stored a 100,000-character reason, and a reason that is not UTF-8 ended in a traceback."""
    job_id = failed_job(store, "submit_exhausted") if action == "retry" else store.create(dict(REQUEST))[0].id
    before = (store.require(job_id), store.events(job_id))
    out = jobs_cli(runtime, action, job_id, "--reason", reason)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--reason" in out.stderr and says in out.stderr and "Traceback" not in out.stderr
    assert (store.require(job_id), store.events(job_id)) == before
    assert messages(redis_client, SUBMIT_QUEUE) == []


@pytest.mark.parametrize("args", [["get"], ["retry"], ["cancel", "--reason", "why"]], ids=["get", "retry", "cancel"])
@pytest.mark.parametrize("suffix", [":events", ":request", "\udcff"], ids=["events", "request", "not-utf8"])
def test_an_id_naming_another_key_is_no_such_job(runtime: Runtime, store: JobStore, args: list[str],
                                                 suffix: str) -> None:
    """Issue: `job_…:events` read the events list and ended "Redis did not answer" (exit 1), not exit 3."""
    job_id = failed_job(store, "submit_exhausted")
    out = jobs_cli(runtime, args[0], (job_id + suffix).encode("utf-8", "surrogateescape"), *args[1:])
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "no such job" in out.stderr and "Redis" not in out.stderr
    assert store.require(job_id).state is JobState.FAILED


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [_cursor('[NaN, "job_x"]'), _cursor('[Infinity, "job_x"]'),
                                    _cursor("[" + "9" * 400 + ', "job_x"]'), _cursor('[1.0, "job_x:events"]'),
                                    "!!"],
                         ids=["nan", "infinity", "huge-int", "not-a-job-id", "not-base64"])
def test_a_malformed_cursor_is_exit_2(runtime: Runtime, store: JobStore, cursor: str) -> None:
    """Issue: a NaN cursor was exit 1 (Redis refused the score), a huge integer a traceback."""
    store.create(dict(REQUEST))
    out = jobs_cli(runtime, "list", "--cursor", cursor)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--cursor" in out.stderr and "Traceback" not in out.stderr


def test_a_valid_reason_with_a_newline_is_recorded(runtime: Runtime, store: JobStore) -> None:
    job, _ = store.create(dict(REQUEST))
    out = jobs_cli(runtime, "cancel", job.id, "--reason", "customer left\nsee ticket 42")
    assert out.returncode == 0, out.stderr
    assert store.events(job.id)[-1].detail["reason"] == "customer left\nsee ticket 42"


def test_jobs_list_sees_every_app_and_filters_by_app(runtime: Runtime, store: JobStore) -> None:
    """Issue 13: the CLI is the operator's tool: every app's jobs, `--app NAME` for one app's."""
    import json

    web, _ = store.create(dict(REQUEST), app="web")
    batch, _ = store.create(dict(REQUEST), app="batch")
    everyone = json.loads(jobs_cli(runtime, "list").stdout)
    assert {j["id"]: j["app"] for j in everyone["jobs"]} == {web.id: "web", batch.id: "batch"}
    only = json.loads(jobs_cli(runtime, "list", "--app", "batch").stdout)
    assert [j["id"] for j in only["jobs"]] == [batch.id]
