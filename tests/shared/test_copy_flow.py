"""Copy flow control (shared/copy_flow.py) on a real redis-server: the storage pause, the per-job waits, and the
expiry a signed result URL carries."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis

from kling_relay.shared import copy_flow
from kling_relay.shared.jobs import JobState, JobStore
from kling_relay.shared.jobs_model import iso_utc


def test_pause_keeps_since_counts_hits_and_resume_returns_it(redis_client: redis.Redis) -> None:
    assert copy_flow.current_pause(redis_client) is None and copy_flow.state(redis_client) == "open"
    assert copy_flow.pause(redis_client, code="NoSuchBucket", message="S3 get manifest failed: NoSuchBucket",
                           job_id="job_a")
    first = copy_flow.current_pause(redis_client)
    assert first is not None
    assert not copy_flow.pause(redis_client, code="AccessDenied", message="S3 put failed: AccessDenied")
    again = copy_flow.current_pause(redis_client)
    assert again is not None
    assert (again["reason"], again["code"], again["hits"], again["since"]) == ("storage", "AccessDenied", 2,
                                                                               first["since"])
    assert copy_flow.state(redis_client) == "paused"
    assert copy_flow.resume(redis_client, by="test") == again
    assert copy_flow.resume(redis_client) is None and copy_flow.current_pause(redis_client) is None


def test_a_probe_is_claimed_once_per_interval(redis_client: redis.Redis) -> None:
    assert copy_flow.claim_probe(redis_client, 30)
    assert not copy_flow.claim_probe(redis_client, 30)


def test_waits_are_listed_oldest_first_and_dropped_once_stale(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    ids = []
    for _ in range(3):
        job, _ = store.create({"prompt": "p"}, due_in=60)
        for state in (JobState.SUBMITTED, JobState.GENERATED):
            store.step(job.id, state, source="worker")
        ids.append(job.id)
    now = time.time()
    for n, job_id in enumerate(ids):
        copy_flow.wait(redis_client, job_id, reason=copy_flow.VIDEO_HOST_REFUSED, host=f"h{n}.example.net",
                       message="not on VIDEO_URL_ALLOWLIST", until=now + 3600 if n else now - 1, since=now + n)
    store.step(ids[2], JobState.CANCELED, source="api")
    listed = copy_flow.waiting(redis_client)
    assert [w["job_id"] for w in listed] == [ids[1]], "past its until, or no longer generated: dropped"
    assert listed[0]["host"] == "h1.example.net" and listed[0]["until"] == iso_utc(now + 3600)
    assert redis_client.hkeys("kr:flow:copy_waits") == [ids[1]]
    assert copy_flow.take_wait(redis_client, ids[1]) is not None
    assert copy_flow.wait_of(redis_client, ids[1]) is None


def _at(text: str) -> float:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("url", "expiry"), [
    ("http://127.0.0.1:9000/_sim/videos/t/v.mp4?expires=1800000000&sig=abc", 1800000000.0),  # the simulator
    ("https://cdn.example.com/v.mp4?Expires=1800000001&Signature=x&Key-Pair-Id=y", 1800000001.0),  # CloudFront
    ("https://b.oss.example.com/v.mp4?OSSAccessKeyId=a&Expires=1800000002&Signature=s", 1800000002.0),
    ("https://cdn.example.com/v.mp4?x-expires=1800000003", 1800000003.0),
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Date=20270115T080000Z&X-Amz-Expires=3600&X-Amz-Signature=s",
     _at("20270115T080000Z") + 3600),
    ("https://storage.googleapis.com/b/v.mp4?X-Goog-Date=20270115T080000Z&X-Goog-Expires=600", _at("20270115T080000Z")
     + 600),
    ("https://p1.a.kwimgs.com/bs2/upload-ylab-stunt/video.mp4?x-kcdn-pid=112452", None),  # Kling's: no expiry shown
    ("https://cdn.example.com/v.mp4?expires=soon", None),
    ("https://cdn.example.com/v.mp4?expires=12", None),  # not Unix seconds
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Date=yesterday&X-Amz-Expires=3600", None),
])
def test_url_expiry_reads_the_usual_signed_url_parameters(url: str, expiry: float | None) -> None:
    assert copy_flow.url_expiry(url) == expiry
