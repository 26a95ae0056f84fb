"""Helpers of the fault-injection tests (tests/e2e/test_faults_*.py): a fast stack with beat, waits, and one
precise check that every job was stored exactly once.

Each fault module starts its own LocalStack (its faults need their own environment: a short Kling timeout,
Redis with AOF, S3 behind a proxy) with a fast schedule: the reconciler runs every second and looks at jobs
quiet for two seconds, retries back off from 0.2 s to at most 2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploy.stack import BUCKET, LocalStack
from tests.support import waiting

T = TypeVar("T")

FAST_SIM_ARGS = ["--submitted-seconds", "0.2", "--processing-seconds", "0.5"]
FAST_ENV = {
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_QUIET_SECONDS": "2",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_SECONDS": "2",
    "MAX_REQUEST_BYTES": "2000000",
    "LOG_LEVEL": "INFO",
}

needs_reconciler = pytest.mark.skipif(
    importlib.util.find_spec("kling_relay.shared.reconcile") is None,
    reason="needs the reconciler (shared/reconcile.py, issue 4), not in this tree yet",
)


@contextmanager
def fault_stack(workdir: Path, *, sim_args: list[str] | None = None, env: dict[str, str] | None = None,
                before_start: Callable[[LocalStack], None] | None = None, workers: int = 1,
                **options: Any) -> Iterator[LocalStack]:
    """A started LocalStack with beat and the fast settings above (env and sim_args are added to them)."""
    stack = LocalStack(workdir, sim_args=[*FAST_SIM_ARGS, *(sim_args or [])], env={**FAST_ENV, **(env or {})},
                       bucket_versioning=True, **options)
    if before_start is not None:
        before_start(stack)
    stack.start(workers=workers, beat=True)
    try:
        yield stack
    finally:
        stack.stop()


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, stack: LocalStack,
               interval: float = 0.1) -> T:
    """tests/support/waiting.py's wait_until with the stack's logs on failure."""
    return waiting.wait_until(check, timeout=timeout, what=what, diagnostics=stack.logs_tail, interval=interval)


def get_job(stack: LocalStack, job_id: str) -> dict[str, Any]:
    response = stack.api("GET", f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def get_jobs(stack: LocalStack, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {job_id: get_job(stack, job_id) for job_id in ids}


def retry_notes(job: dict[str, Any], reason_prefix: str) -> list[dict[str, Any]]:
    """The job's retry notes (`{"retry_in", "reason", "attempt"}` events) whose reason starts with the prefix."""
    return [e for e in job["events"]
            if e["from"] == e["to"] and str(e["detail"].get("reason", "")).startswith(reason_prefix)]


def job_prefix(job: dict[str, Any]) -> str:
    return str(job["videos"][0]["key"]).rsplit("/", 1)[0] + "/"


def assert_callbacks_tripled_and_reordered(stats: dict[str, Any], job: dict[str, Any]) -> None:
    """The fault really happened to `job` (sim knobs callback_duplicate=3, callback_reorder): each status reached the
    relay three times, and 'processing' only after 'succeed'. A callback that beat the create's answer was answered
    202 (kept, applied once the task is bound), so 200 and 202 both count as delivered."""
    delivered = [c["status"] for c in stats["callbacks"][job["kling_task_id"]] if c.get("http_status") in (200, 202)]
    assert Counter(delivered) == {"submitted": 3, "processing": 3, "succeed": 3}, delivered
    assert delivered.index("processing") > delivered.index("succeed"), delivered


def assert_stored_once(stack: LocalStack, jobs: dict[str, dict[str, Any]], *, video_versions: int | None = 1) -> None:
    """Every job stored with one Kling task, one video and one manifest, byte-identical to what Kling served.

    Checks, per job: state `stored` with no error; the simulator made exactly one task for it (and never saw a
    second create with its external_task_id); `generated` and `stored` each entered once; the objects under its
    prefix are exactly `manifest.json` and `video.mp4`; the manifest was written once (one version; the bucket
    is versioned) and the video `video_versions` times (None: any number, all current bytes still checked);
    the video's bytes hash to the sha256 in the job, in the manifest and of the file the simulator served.
    And no multipart upload is left open under any of the jobs' prefixes.
    """
    stats = stack.sim_stats()
    s3 = stack.s3()
    for job_id, job in jobs.items():
        assert job["state"] == "stored", (job_id, job["state"], job["error"])
        assert job["error"] is None
        assert stats["tasks_by_external_id"].get(job_id) == [job["kling_task_id"]], job_id
        assert job_id not in stats["duplicate_creates"], (job_id, stats["duplicate_creates"])
        entered = [e["to"] for e in job["events"] if e["from"] != e["to"]]
        assert entered.count("generated") == 1 and entered.count("stored") == 1, entered
        assert len(job["videos"]) == 1, job["videos"]
        video = job["videos"][0]
        prefix = job_prefix(job)
        listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        assert sorted(o["Key"][len(prefix):] for o in listing.get("Contents", [])) == ["manifest.json", "video.mp4"]
        versions = s3.list_object_versions(Bucket=BUCKET, Prefix=prefix)
        assert not versions.get("DeleteMarkers"), versions.get("DeleteMarkers")
        per_key: dict[str, int] = {}
        for v in versions.get("Versions", []):
            per_key[v["Key"][len(prefix):]] = per_key.get(v["Key"][len(prefix):], 0) + 1
        assert per_key.get("manifest.json") == 1, per_key
        if video_versions is not None:
            assert per_key.get("video.mp4") == video_versions, per_key
        data = s3.get_object(Bucket=BUCKET, Key=video["key"])["Body"].read()
        served = [v["sha256"] for v in stats["videos"][job["kling_task_id"]]]
        assert len(data) == video["bytes"]
        assert [hashlib.sha256(data).hexdigest()] == [video["sha256"]] == served
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "manifest.json")["Body"].read())
        assert (manifest["job_id"], manifest["kling_task_id"]) == (job_id, job["kling_task_id"])
        assert [(v["key"], v["sha256"], v["bytes"]) for v in manifest["videos"]] == [
            (video["key"], video["sha256"], video["bytes"])]
    open_uploads = [u["Key"] for u in stack.multipart_uploads() if any(f"/{job_id}/" in u["Key"] for job_id in jobs)]
    assert open_uploads == []
