"""Issue 12 item 6, proven on several hosts: the relay spread over network namespaces of this machine
(deploy/hosts.py), one host each for Redis, S3 (moto), the Kling simulator, two web hosts behind a load balancer
(PUBLIC_BASE_URL: the simulator's callbacks go through it), three worker hosts and a beat host, every process
bound to its own host's address. 500 jobs go in through the load balancer; once a third are stored, one worker
host is cut off (its link down, then its processes SIGKILLed) while it holds work. The other two worker hosts and
the reconciler finish everything: every job `stored`, one Kling task each, each object once beside its manifest,
no multipart upload left open. `make scale-test` runs just this.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from PIL import Image

from deploy.hosts import HostsStack, NetnsUnavailable, Network, topology, unavailable_reason
from deploy.stack import BUCKET, DEMO_API_TOKEN
from kling_relay.shared import keys
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # ~2.5 min on a loaded 2-vCPU VM

JOBS = 500
CUT_AFTER = JOBS // 3
SIM_ARGS = ["--submitted-seconds", "0", "--processing-seconds", "0", "--video-bytes", "1024"]
#: Around the cut the simulator makes videos over one S3 part (8 MiB), so copies in flight are multipart uploads
#: (the ones a cut-off host can leave open); before and after, 1 KiB videos (one PutObject each).
BIG_FROM = CUT_AFTER - 10
BIG_VIDEO_BYTES = 9 * 1024 * 1024
ENV = {
    "KLING_RATE_LIMIT_PER_SECOND": "100000",
    "KLING_MAX_IN_FLIGHT": "100000",
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_QUIET_SECONDS": "20",
    "JOB_LOCK_SECONDS": "10",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_SECONDS": "2",
}


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 320), (40, 140, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture()
def hosts_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostsStack]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        net = Network.create(topology(3))
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        stack = HostsStack(tmp_path_factory.mktemp("hosts"), net, sim_args=SIM_ARGS, env=ENV, worker_concurrency=2,
                           web_workers=1, bucket_versioning=True)
        try:
            stack.start(workers=3, beat=True)
            yield stack
        finally:
            stack.stop()
    finally:
        net.delete()


def submit_all(stack: HostsStack, count: int) -> list[str]:
    body = {"image_list": [{"image": small_png()}], "prompt": "hosts", "aspect_ratio": "16:9", "duration": 5}
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {DEMO_API_TOKEN}"

    def one(_: int) -> str:
        response = session.post(f"{stack.web_url}/v1/jobs", json=body, timeout=30)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def read_jobs(stack: HostsStack, ids: list[str]) -> dict[str, dict[str, Any]]:
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {DEMO_API_TOKEN}"

    def one(job_id: str) -> dict[str, Any]:
        response = session.get(f"{stack.web_url}/v1/jobs/{job_id}", timeout=30)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    with ThreadPoolExecutor(8) as pool:
        return dict(zip(ids, pool.map(one, ids), strict=True))


def in_flight(log_path: Path) -> dict[str, str]:
    """The Celery tasks of jobs (submit, copy, notify; not the reconciler's) a worker had received and not finished,
    from its JSON log: task id -> job id."""
    received: dict[str, str] = {}
    finished: set[str] = set()
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill, or not ours
        data = record.get("data") if isinstance(record, dict) else None
        if not isinstance(data, dict) or "id" not in data:
            continue
        if record.get("logger") == "celery.worker.strategy" and record.get("job_id"):
            received[data["id"]] = record["job_id"]
        elif record.get("logger") == "celery.app.trace":
            finished.add(data["id"])
    return {task: job for task, job in received.items() if task not in finished}


def unacked_task_ids(client: redis.Redis) -> set[str]:
    """Ids of the tasks whose messages the broker holds as delivered and not acknowledged (kombu's `unacked`)."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}


def test_jobs_survive_a_worker_host_cut_off(hosts_stack: HostsStack) -> None:
    stack = hosts_stack
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True, socket_timeout=10)
    stored_index = keys.jobs_in_state("stored")

    def counts() -> str:
        return (f"stored {client.zcard(stored_index)}, failed {client.zcard(keys.jobs_in_state('failed'))}\n"
                f"{stack.logs_tail(20)}")

    ids = submit_all(stack, JOBS)
    assert len(set(ids)) == JOBS
    wait_until(lambda: client.zcard(stored_index) >= BIG_FROM, timeout=180, what=f"{BIG_FROM} jobs stored",
               diagnostics=counts, interval=0.2)
    stack.sim_control(video_bytes=BIG_VIDEO_BYTES)
    wait_until(lambda: client.zcard(stored_index) >= CUT_AFTER, timeout=180, what=f"{CUT_AFTER} jobs stored",
               diagnostics=counts, interval=0.2)
    left = JOBS - client.zcard(stored_index)
    assert left > JOBS // 3, left  # the cut comes with plenty of work still to do
    stack.cut("worker1")
    stack.sim_control(video_bytes=1024)
    # what worker1 held when it went (received, not finished): acks are late, so those messages stay unacknowledged
    # in the broker for its visibility timeout (two hours); the reconciler re-queues their jobs once locks lapse
    lost = in_flight(stack.logs / "worker1.log")
    assert lost, "worker1 held no task when cut off"

    wait_until(lambda: client.zcard(stored_index) >= JOBS, timeout=240, what=f"all {JOBS} jobs stored",
               diagnostics=counts, interval=0.5)
    jobs = read_jobs(stack, ids)
    assert Counter(j["state"] for j in jobs.values()) == {"stored": JOBS}
    assert set(lost.values()) <= set(ids)
    assert set(lost) <= unacked_task_ids(client)  # never redelivered by the broker, yet their jobs are stored

    stats = stack.sim_stats()
    for job_id, job in jobs.items():  # one Kling task per job, the one the job names
        assert stats["tasks_by_external_id"].get(job_id) == [job["kling_task_id"]], job_id
    assert not set(stats["duplicate_creates"]) & set(ids), stats["duplicate_creates"]
    assert len({j["kling_task_id"] for j in jobs.values()}) == JOBS

    s3 = stack.s3()
    big = [j["id"] for j in jobs.values() if j["videos"][0]["bytes"] > 8 * 1024 * 1024]
    assert big, "no video went up as a multipart upload around the cut"
    assert stack.multipart_uploads() == []
    versions: dict[str, int] = Counter()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=BUCKET):
        assert not page.get("DeleteMarkers")
        for v in page.get("Versions", []):
            versions[v["Key"]] += 1
    manifests = {}
    for job in jobs.values():
        assert len(job["videos"]) == 1, job["videos"]
        manifests[job["videos"][0]["key"].rsplit("/", 1)[0] + "/manifest.json"] = job
    videos = {job["videos"][0]["key"]: job for job in jobs.values()}
    assert set(versions) == set(manifests) | set(videos)  # nothing else in the bucket
    assert {versions[key] for key in manifests} == {1}  # each manifest written once
    # each video once, except where worker1's completed upload reached S3 as its link went down (the answer lost):
    # the copy that took over wrote the same bytes again
    rewritten = {key for key in videos if versions[key] > 1}
    assert {videos[key]["id"] for key in rewritten} <= set(lost.values()), rewritten
    for key in rewritten:
        data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        served = [v["sha256"] for v in stats["videos"][videos[key]["kling_task_id"]]]
        assert [hashlib.sha256(data).hexdigest()] == [videos[key]["videos"][0]["sha256"]] == served

    def manifest(key: str) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        return body

    with ThreadPoolExecutor(8) as pool:
        written = dict(zip(manifests, pool.map(manifest, manifests), strict=True))
    for key, job in manifests.items():
        job_id, m = job["id"], written[key]
        assert (m["job_id"], m["kling_task_id"]) == (job_id, job["kling_task_id"])
        assert [(v["key"], v["sha256"], v["bytes"]) for v in m["videos"]] == [
            (v["key"], v["sha256"], v["bytes"]) for v in job["videos"]]
    client.close()
