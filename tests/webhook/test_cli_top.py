"""`kling-relay top` and `kling-relay jobs watch`: the real command in a subprocess, on the test redis-server."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

import redis
from rich.console import Console

from kling_relay.shared import flow
from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.queue import COPY_QUEUE, SUBMIT_QUEUE
from kling_relay.shared.runtime import Runtime
from kling_relay.shared.top import overview, render, top, watch
from tests.shared.test_ops import REQUEST, failed_job
from tests.support.procs import free_port
from tests.webhook.test_status import REPO_ROOT, _env


def cli(runtime: Runtime, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kling_relay.shared.cli", *args],
                          env={**_env(runtime), "COLUMNS": "160", **env}, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_top_once_prints_the_overview(runtime: Runtime, redis_client: redis.Redis) -> None:
    store = runtime.store
    for _ in range(2):
        store.create(dict(REQUEST))
    failed_job(store, "submit_exhausted")
    runtime.enqueuer.submit("job_queued_twice")
    runtime.enqueuer.submit("job_queued_twice")
    runtime.enqueuer.copy("job_copy")
    flow.pause(runtime.redis, code=1102, message="account balance not enough")
    out = cli(runtime, "top", "--once", KLING_MAX_IN_FLIGHT="7", KLING_DAILY_UNIT_BUDGET="300")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "submission: paused (account 1102)" in text and "account balance not enough" in text, text
    assert "copy: open" in text
    assert "in flight at Kling: 0 / 7" in text
    assert "units today" in text and "/ 300" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "queued" in line and "stored" in line)
    assert re.findall(r"\d+", lines[header + 2]) == ["2", "0", "0", "0", "0", "1", "0"], text
    queues = next(i for i, line in enumerate(lines) if SUBMIT_QUEUE in line and COPY_QUEUE in line)
    assert re.findall(r"\d+", lines[queues + 2]) == ["2", "1", "0", "0"], text


def test_overview_reads_counters_not_jobs(runtime: Runtime) -> None:
    """The view is a handful of counters whatever the number of jobs (no scan): same shape, same calls."""
    store = runtime.store
    store.create(dict(REQUEST))
    view = overview(store, cap=3, budget=None)
    assert view["jobs"]["queued"] == 1 and view["in_flight_total"] == 0 and view["max_in_flight"] == 3
    assert view["submission"] == "open" and view["copy"] == "open"
    assert set(view["queues"]) == {"submit", "copy", "notify", "reconcile"}
    render(view)  # draws without a terminal


def test_watch_follows_a_job_to_stored(runtime: Runtime) -> None:
    store = runtime.store
    job, _ = store.create(dict(REQUEST))
    proc = subprocess.Popen([sys.executable, "-m", "kling_relay.shared.cli", "jobs", "watch", job.id,
                             "--timeout", "120"], env=_env(runtime), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    store.step(job.id, JobState.SUBMITTED, source="worker", set_fields={"kling_task_id": "task-77"},
               detail={"kling_task_id": "task-77"})
    store.note(job.id, source="worker", detail={"retry_in": 1.5, "reason": "ambiguous create"})
    store.step(job.id, JobState.PROCESSING, source="callback")
    store.step(job.id, JobState.GENERATED, source="callback")
    video = {"bucket": "b", "key": f"videos/{job.id}/0.mp4", "sha256": "0" * 64, "bytes": 1, "duration": 5.0}
    store.step(job.id, JobState.STORED, source="worker", set_fields={"videos": [video]}, due_in=None)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    for change in ("new -> queued", "queued -> submitted", "submitted -> processing", "processing -> generated",
                   "generated -> stored"):
        assert sum(change in line for line in lines) == 1, stdout
    assert any("retry_in=1.5" in line and "ambiguous create" in line for line in lines), stdout
    assert "kling_task_id=task-77" in lines[-2]
    assert lines[-1] == f"{job.id} stored: s3://b/videos/{job.id}/0.mp4"


def test_watch_exit_codes(runtime: Runtime) -> None:
    store = runtime.store
    failed = failed_job(store, "submit_exhausted")
    out = cli(runtime, "jobs", "watch", failed)
    assert out.returncode == 5 and out.stdout.splitlines()[-1] == f"{failed} failed: submit_exhausted it broke"
    assert cli(runtime, "jobs", "watch", "job_nope").returncode == 3
    queued, _ = store.create(dict(REQUEST))
    out = cli(runtime, "jobs", "watch", queued.id, "--timeout", "0.5")
    assert out.returncode == 1 and "still queued" in out.stderr


def test_watch_prints_each_event_once_when_the_timeline_is_capped(redis_client: redis.Redis) -> None:
    """The timeline keeps its latest events only: positions shift, so the watcher finds its place by value."""
    store = JobStore(redis_client, max_events=3)
    job, _ = store.create(dict(REQUEST))
    out = io.StringIO()
    polls = iter([lambda n=n: store.note(job.id, source="worker", detail={"n": n}) for n in range(5)]
                 + [lambda: store.step(job.id, JobState.CANCELED, source="api", due_in=None)])
    watch(store, job.id, out=out, poll=0, sleep=lambda _: next(polls)())
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in lines[1:6]] == [f"n={n}" for n in range(5)], lines
    assert "queued -> canceled" in lines[6] and lines[7] == f"{job.id} canceled" and len(lines) == 8, lines


def test_top_keeps_running_through_a_redis_outage(redis_client: redis.Redis) -> None:
    """The live view says Redis did not answer and shows the relay again once it is back (a Redis restart must
    not end an operator's `top`)."""
    store = JobStore(redis.Redis(port=free_port(), decode_responses=True, socket_connect_timeout=1))
    sleeps = 0

    def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps > 1:
            raise KeyboardInterrupt
        store._r = redis_client  # Redis is back

    out = io.StringIO()
    with contextlib.suppress(KeyboardInterrupt):
        top(store, console=Console(file=out, width=120, force_terminal=True, color_system=None), sleep=sleep)
    text = out.getvalue()
    assert text.index("Redis did not answer: ConnectionError") < text.index("submission: open"), text
